"""Text conditioning for each model family, encoded as its diffusers pipeline encodes it."""

from __future__ import annotations

import torch

from hpcrender.config import Job
from hpcrender.models import T5_TOKENS
from hpcrender.models.reference import Family


def t5_tokens(pipe, fam: Family) -> int:
    """The T5 sequence length a DiT pipeline is run with."""
    tokenizer = getattr(pipe, {Family.PIXART: "tokenizer", Family.SD3: "tokenizer_3", Family.FLUX: "tokenizer_2"}[fam],
                        None)
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(T5_TOKENS[fam], int(limit)) if limit else T5_TOKENS[fam]


def encode_prompt(pipe, fam: Family, job: Job, device, guidance: bool) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning for the batch [uncond, cond] (or [cond] without guidance), and the model's extra inputs
    (SDXL's pooled text and time ids, PixArt's text mask, SD3's and Flux's pooled text, Flux's text ids)."""
    negative = job.negative_prompt or None
    if fam is Family.PIXART:
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            job.prompt, guidance, negative_prompt=job.negative_prompt, num_images_per_prompt=1, device=device,
            clean_caption=False, max_sequence_length=t5_tokens(pipe, fam))
        if guidance:
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        return embeds, {"encoder_attention_mask": mask}
    if fam is Family.SD3:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=job.prompt, prompt_2=None, prompt_3=None, negative_prompt=negative,
            do_classifier_free_guidance=guidance, device=device, num_images_per_prompt=1,
            max_sequence_length=t5_tokens(pipe, fam))
        if guidance:
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return embeds, {"pooled_projections": pooled}
    if fam is Family.FLUX:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=job.prompt, prompt_2=None, device=device,
                                                      num_images_per_prompt=1, max_sequence_length=t5_tokens(pipe, fam))
        return embeds, {"pooled_projections": pooled, "txt_ids": text_ids}
    if fam is Family.SDXL:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            job.prompt, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance, negative_prompt=negative)
        proj_dim = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                    else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids((job.height, job.width), (0, 0), (job.height, job.width),
                                          dtype=embeds.dtype, text_encoder_projection_dim=proj_dim).to(device)
        if guidance:
            embeds = torch.cat([neg, embeds])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}
    embeds, neg = pipe.encode_prompt(job.prompt, device, 1, guidance, negative)
    if guidance:
        embeds = torch.cat([neg, embeds])
    return embeds, None


def encode_prompts(pipe, fam: Family, jobs, device, guidance: bool) -> tuple[torch.Tensor, dict | None] | None:
    """encode_prompt for a batch of jobs in one call of each text encoder, as diffusers' pipelines encode a list of
    prompts: the batch [uncond x B, cond x B] (or [cond x B]) and the extra inputs laid out alike. None where one call
    would not encode what encode_prompt does for each job alone: SDXL zeroes the negative embeddings of an empty
    negative prompt (force_zeros_for_empty_prompt) only when no negative prompt is given at all."""
    prompts = [job.prompt for job in jobs]
    negatives = [job.negative_prompt for job in jobs]
    any_negative = any(negatives)
    first = jobs[0]
    if fam is Family.PIXART:
        embeds, mask, neg, neg_mask = pipe.encode_prompt(
            prompts, guidance, negative_prompt=negatives, num_images_per_prompt=1, device=device,
            clean_caption=False, max_sequence_length=t5_tokens(pipe, fam))
        if guidance:
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])
        return embeds, {"encoder_attention_mask": mask}
    if fam is Family.SD3:
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negatives if any_negative else None,
            do_classifier_free_guidance=guidance, device=device, num_images_per_prompt=1,
            max_sequence_length=t5_tokens(pipe, fam))
        if guidance:
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        return embeds, {"pooled_projections": pooled}
    if fam is Family.FLUX:
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                      num_images_per_prompt=1, max_sequence_length=t5_tokens(pipe, fam))
        return embeds, {"pooled_projections": pooled, "txt_ids": text_ids}
    if fam is Family.SDXL:
        if any_negative and not all(negatives) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            return None
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negatives if any_negative else None)
        proj_dim = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                    else int(pooled.shape[-1]))
        time_ids = pipe._get_add_time_ids((first.height, first.width), (0, 0), (first.height, first.width),
                                          dtype=embeds.dtype, text_encoder_projection_dim=proj_dim).to(device)
        time_ids = time_ids.repeat(len(jobs), 1)
        if guidance:
            embeds = torch.cat([neg, embeds])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return embeds, {"text_embeds": pooled, "time_ids": time_ids}
    embeds, neg = pipe.encode_prompt(prompts, device, 1, guidance, negatives if any_negative else None)
    if guidance:
        embeds = torch.cat([neg, embeds])
    return embeds, None
