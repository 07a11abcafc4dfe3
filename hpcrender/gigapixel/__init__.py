"""Gigapixel renders: a base render, then x2 levels of overlapping tiles refined by img2img, each tile a unit that any
rank group renders in any order, composed level by level in a fixed order into the HDF5 level store.

May import: render, parallel, models, output, the input (config, errors) and, for kind.py alone, run's kind interface
(run.kinds, run.protocol, run.environment, run.progress). plan.py holds the arithmetic, pixels.py the region-wise
pixel operations, compose.py the writer's side, render.py the torch side, job.py a job's store and outputs, kind.py
the job kind the work queue drives over every group of the world (render.render_gigapixel drives one group alike):

    plan = gigapixel_plan(job, vae_scale, alignment)          # or render.plan_for(facts, job)
    store = job.open_store(job_dir, job, plan)                # the one writer
    level 0: render.render_base(...) -> store.write_patch(0, unit, patch); compose_level(store, plan, 0)
    level k: for unit in level_units(plan, k) (any group, any order, skipping store.patch_done):
                 render.render_tile(pipe, job, plan, unit, read_previous, layout, comms, device, should_stop)
                 -> store.write_patch(k, unit, patch)
             when store.missing_patches(k) is empty: compose_level(store, plan, k)
"""
