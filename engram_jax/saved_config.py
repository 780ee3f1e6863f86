"""A checkpoint's saved config as an ml_collections config file.

eval.py, generate.py, patch.py and train.py (resuming a workdir) take `--config.a.b=v` overrides
without `--config`: the overrides then change the config the checkpoint was written with. Overrides
exist only as flags of a config flag, so `cli.parse_flags` loads the saved config, keeps it in
`cli.saved_config_for_overrides` and passes this file as `--config`; `get_config` hands it over.
"""


def get_config():
  from engram_jax import cli

  if cli.saved_config_for_overrides is None:
    raise ValueError("engram_jax/saved_config.py is not a preset: pass --config configs/<preset>.py, or give "
                     "--config.a.b=v overrides together with --workdir or --checkpoint")
  return cli.saved_config_for_overrides
