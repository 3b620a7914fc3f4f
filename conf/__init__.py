"""approxrun's Hydra config tree (installed as the package ``approxrun.conf``)."""
