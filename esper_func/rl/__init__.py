"""PPO over the envs: the trainer, run configs, the train and evaluate CLIs, distributed collection, run files."""
