"""Sampling from a checkpoint on the command line (`python -m models.generate`).

    python -m models.generate --config.checkpoint=runs/quickstart --config.prompts.text='def quicksort(xs):'
    python -m models.generate --config.checkpoint=path/to/hf_dir --config.prompts.file=prompts.jsonl \
        --config.output.path=out.jsonl --config.output.format=jsonl --config.sampler.temperature=0.8 \
        --config.mesh.ici.fsdp=4 --config.mesh.ici.tensor=2

Sections: checkpoint (a codelm run directory or a Hugging Face directory), prompts, sampler (as in
training configs), mesh (as in training configs), model overrides for HF checkpoints, output.
"""

from ml_collections import ConfigDict

from configs import base


def get_config(arg: str = "") -> ConfigDict:
    del arg
    train = base.get_config()
    cfg = ConfigDict()
    cfg.checkpoint = ""
    cfg.prompts = ConfigDict()
    cfg.prompts.text = ""  # one prompt
    cfg.prompts.file = ""  # .jsonl: a JSON string, {"prompt": str} or {"messages": [...]} per line; else one prompt
    cfg.prompts.chat = False  # render plain prompts as a user turn of the chat template
    cfg.prompts.system = ""  # system message for chat
    cfg.sampler = train.sampler
    cfg.sampler.max_new_tokens = 128
    cfg.sampler.max_len = 2048
    cfg.sampler.stop = ""  # comma-separated stop strings
    cfg.sampler.seed = 0
    cfg.sampler.batch_size = 32  # prompts per generate call
    cfg.mesh = train.mesh
    cfg.model = ConfigDict({"dtype": "", "param_dtype": ""})  # HF checkpoints: "" keeps the checkpoint's
    cfg.output = ConfigDict({"path": "", "format": "text"})  # text | jsonl; path "" writes to stdout
    return cfg
