"""Planning without the weights: from a config.json alone (`from_config`), fetched from the
Hugging Face Hub by model id (`hub`). Planning with the weights is `edgemoe.pipeline`."""
