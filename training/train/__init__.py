"""Training: one loop (`trainer.Trainer`, with callbacks) for every train module (`module.TrainModule`; megatron-core's
GPT in `gpt_module`), the per-micro-batch losses stages plug in (`losses`) and the schedules (`schedules`)."""
