"""The full set of fields a codelm training run reads; every other config starts from this one.

    python -m train.pretrain --config=configs/base.py --config.model.preset=llama-100m \
        --config.train.steps=10000 --config.mesh.ici.fsdp=-1

Pure data: each section is validated once at load into the typed schema that owns it (model:
models/config.py, data: data/config.py, mesh: models/sharding.py, sampler: models/sampler.py,
optim: train/optimizer.py, train and checkpoint: train/config.py); errors name the field path.
"""

from ml_collections import ConfigDict, config_dict

_EMBEDDED_CORPUS = "artifacts/corpus"

# Model fields that override the preset when set (None keeps the preset's value); the schema test
# keeps this list equal to ModelConfig's fields.
MODEL_FIELDS = {
    "vocab_size": int, "d_model": int, "n_layers": int, "n_heads": int, "n_kv_heads": int, "head_dim": int,
    "d_ff": int, "norm": str, "norm_eps": float, "mlp": str, "mlp_bias": bool, "qkv_bias": bool, "out_bias": bool,
    "qk_norm": bool, "rope_theta": float, "sliding_window": int, "tie_embeddings": bool, "logit_softcap": float,
    "max_seq_len": int, "init_std": float, "dtype": str, "param_dtype": str, "scan_layers": bool, "remat": str,
    "attention_impl": str, "layer_types": str, "global_every": int, "cross_entropy_chunk": int,
    "query_pre_attn_scalar": int, "attn_logit_softcap": float, "scale_embeddings": bool, "post_norms": bool,
    "norm_scale_offset": float, "sliding_rope_theta": float, "attention_sinks": bool, "swiglu_limit": float,
    "mtp_depth": int, "mtp_loss_weight": float,
}
ROPE_SCALING_FIELDS = {
    "kind": str, "factor": float, "original_max_position": int, "low_freq_factor": float,
    "high_freq_factor": float, "beta_fast": float, "beta_slow": float, "attention_factor": float,
    "truncate": bool,
}
MOE_FIELDS = {
    "num_experts": int, "experts_per_token": int, "expert_d_ff": int, "num_shared_experts": int,
    "first_dense_layers": int, "router": str, "normalize_top_k": bool, "routed_scaling": float, "impl": str,
    "grouped_matmul": str, "capacity_factor": float, "aux_loss_coef": float, "router_z_loss_coef": float,
    "bias_update_rate": float, "sparse_step": int, "num_groups": int, "topk_groups": int,
    "router_bias": bool, "expert_bias": bool,
}
# Multi-head latent attention (models/mla.py): off unless a field is set (or the preset has it).
MLA_FIELDS = {
    "q_lora_rank": int, "kv_lora_rank": int, "qk_nope_head_dim": int, "qk_rope_head_dim": int, "v_head_dim": int,
    "score_scale": float,
}
# LoRA (models/lora.py): off unless a field is set; targets is a comma-separated list of path regexes.
LORA_FIELDS = {"rank": int, "alpha": float, "dropout": float, "targets": str, "init": str}


def _placeholders(fields: dict) -> ConfigDict:
    return ConfigDict({name: config_dict.placeholder(kind) for name, kind in fields.items()})


def model_section(preset: str) -> ConfigDict:
    """`preset` plus every model field unset: `--config.model.d_model=1024` or
    `--config.model.moe.bias_update_rate=1e-3` override the preset's value, unset fields keep it."""
    section = _placeholders(MODEL_FIELDS)
    section.preset = preset
    section.rope_scaling = _placeholders(ROPE_SCALING_FIELDS)
    section.moe = _placeholders(MOE_FIELDS)
    section.lora = _placeholders(LORA_FIELDS)
    section.mla = _placeholders(MLA_FIELDS)
    return section


def source(kind: str, splits: dict, *, weight: float = 1.0, text_field: str = "text", tfds_name: str = "",
           tfds_data_dir: str = "") -> ConfigDict:
    """One data source: kind jsonl | arrayrecord | tfds; splits maps split name -> files/globs (or a
    TFDS split expression); weight is its share of the mixture."""
    return ConfigDict({"kind": kind, "splits": dict(splits), "weight": float(weight), "text_field": text_field,
                       "tfds_name": tfds_name, "tfds_data_dir": tfds_data_dir})


def embedded_corpus_source() -> ConfigDict:
    """The embedded stdlib corpus (`data/corpus.py` builds it on first use)."""
    return source("arrayrecord", {split: f"{_EMBEDDED_CORPUS}/arrayrecord/{split}-*.array_record"
                                  for split in ("train", "validation")})


def get_config(arg: str = "") -> ConfigDict:
    del arg
    cfg = ConfigDict()
    cfg.model = model_section("llama-100m")

    cfg.data = ConfigDict()
    cfg.data.sources = ConfigDict({"stdlib": embedded_corpus_source()})
    cfg.data.tokenizer_path = f"{_EMBEDDED_CORPUS}/tokenizer.model"
    cfg.data.seq_len = 2048
    cfg.data.batch_size = 256  # global, over all processes
    cfg.data.shuffle = True
    cfg.data.shuffle_seed = 0
    cfg.data.num_epochs = config_dict.placeholder(int)  # None: repeat forever
    cfg.data.num_workers = 0  # grain worker processes; 0 keeps everything in this process
    cfg.data.read_threads = 2  # threads reading + tokenizing documents (per process or worker)
    cfg.data.prefetch_buffer_size = 64  # documents read ahead by those threads
    cfg.data.packing_bins = 32  # rows filled at once by first-fit packing (more: less padding)
    # Code files are often longer than a row: mix the chunks of ~1k rows so no batch is one file.
    cfg.data.chunk_shuffle_window = 1024
    cfg.data.host_sharding = "records"  # records: each host reads 1/P of the data | global: see data/config.py
    # Fill-in-the-middle (Bavarian et al. 2022), PSM and SPM mixed: data/code/fim.py.
    cfg.data.fim = ConfigDict()
    cfg.data.fim.fim_rate = 0.5  # fraction of row chunks (or packed documents) permuted
    cfg.data.fim.spm_rate = 0.5  # fraction of permuted ones in SPM rather than PSM layout
    cfg.data.fim.level = "chunk"  # chunk: per row-sized piece | context: per packed row | document

    cfg.mesh = ConfigDict()
    cfg.mesh.ici = ConfigDict({"data": 1, "fsdp": -1, "expert": 1, "sequence": 1, "tensor": 1})
    cfg.mesh.dcn = ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1})
    cfg.mesh.rules = "default"  # a rule set of configs/sharding_rules.py

    cfg.optim = ConfigDict()
    cfg.optim.lr = 3e-4
    cfg.optim.schedule = "cosine"  # cosine | wsd | constant
    cfg.optim.warmup_steps = 1000
    cfg.optim.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
    cfg.optim.wsd_decay_fraction = 0.2  # wsd: last fraction of steps decays linearly
    cfg.optim.b1 = 0.9
    cfg.optim.b2 = 0.95
    cfg.optim.eps = 1e-8
    cfg.optim.weight_decay = 0.1
    cfg.optim.decay_norms = False
    cfg.optim.decay_biases = False
    cfg.optim.decay_embeddings = False
    cfg.optim.clip_norm = 1.0  # global gradient norm; 0 disables clipping

    cfg.train = ConfigDict()
    cfg.train.steps = 10000
    cfg.train.grad_accum = 1  # micro-batches per step (data.batch_size is split among them)
    cfg.train.z_loss = 0.0  # coefficient of log(Z)^2 (PaLM uses 1e-4)
    cfg.train.seed = 0
    cfg.train.on_nonfinite = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    cfg.train.log_every = 10
    cfg.train.eval_every = 500
    cfg.train.eval_batches = 20
    cfg.train.output_dir = "runs/base"
    cfg.train.init_from = ""  # pretraining: a run directory or HF checkpoint to start from (weights only)
    cfg.train.peak_tflops_per_device = 0.0  # 0: look the device up (unknown devices report no MFU)
    cfg.train.profile_start_step = 0  # with profile_num_steps > 0: trace those steps into output_dir/profile
    cfg.train.profile_num_steps = 0

    cfg.checkpoint = ConfigDict()
    cfg.checkpoint.every = 500
    cfg.checkpoint.keep_last = 3
    cfg.checkpoint.keep_every = 0  # also keep every M-th step forever; 0 disables
    cfg.checkpoint.async_save = True
    cfg.checkpoint.resume = True
    # Resuming refuses changed optimizer/schedule fields (optim.*, train.steps, train.grad_accum,
    # data.batch_size) unless listed here, e.g. "train.steps,optim.lr" or "optim" (a whole section).
    cfg.checkpoint.allow_changes = ""

    cfg.sampler = ConfigDict()
    cfg.sampler.prompt = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    cfg.sampler.max_new_tokens = 64
    cfg.sampler.temperature = 0.0  # 0: greedy
    cfg.sampler.top_k = 0
    cfg.sampler.top_p = 1.0
    cfg.sampler.max_len = 256
    return cfg
