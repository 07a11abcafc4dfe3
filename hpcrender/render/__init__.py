"""One image on one rank group, in the stages of diffusers' pipelines: prompt, latents, samplers, the denoising loop
(stages.py), text-to-image and img2img (image.py), a loop stopped and resumed exactly (checkpoint.py).

May import: models, parallel, output (atomic files) and the input (config, errors); never run, gigapixel or measure.
"""
