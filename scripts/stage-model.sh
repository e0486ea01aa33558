#!/usr/bin/env bash
# Carry a model directory to the GPU machine, which reaches no registry and takes at most 64 MiB
# per call: split it here into parts of PART_MIB (default 56) under .gpu/model-NAME/pNN (git-ignored),
# then send one part per call, back to back (the machine keeps files outside $OUT ~30 s between calls):
#
#   bash scripts/stage-model.sh ~/.cache/vllm-kvquant/models/smollm2 smollm2     # here: prints the calls
#   call k: carry [".gpu/model-smollm2/pKK"]  command: bash scripts/stage-model.sh --receive smollm2 pKK
#
# --receive appends the part under /root/stage/model-NAME and, once every part is there (the count
# and the SHA-256 of the whole archive travel in every part), unpacks the directory to
# /root/stage/models/NAME and checks it: then e.g. KVQ_ACCURACY_ARGS="--smollm2-dir /root/stage/models/smollm2".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --receive ]; then
  name=${2:?usage: stage-model.sh --receive NAME PART}
  part=${3:?usage: stage-model.sh --receive NAME PART}
  src=.gpu/model-$name/$part
  root=${KVQ_STAGE_ROOT:-/root/stage}
  stage=$root/model-$name
  [ -d "$src" ] || { echo "stage-model: $src was not carried (carry [\".gpu/model-$name/$part\"])" >&2; exit 2; }
  mkdir -p "$stage"
  cp "$src"/chunk "$stage/$part.chunk"
  read -r total sha <"$src/manifest"
  have=$(ls "$stage"/*.chunk | wc -l)
  echo "stage-model: $name part $part received ($have of $total)"
  if [ "$have" -eq "$total" ]; then
    cat "$stage"/p*.chunk >"$stage/model.tar"
    echo "$sha  $stage/model.tar" | sha256sum -c --quiet - || { echo "stage-model: $name archive checksum differs" >&2; exit 1; }
    mkdir -p "$root/models"
    tar -xf "$stage/model.tar" -C "$root/models"
    rm -f "$stage/model.tar"
    echo "stage-model: $root/models/$name ready"
    ls -la "$root/models/$name"
  fi
  exit 0
fi
model_dir=${1:?usage: stage-model.sh MODEL_DIR NAME | --receive NAME PART}
name=${2:?usage: stage-model.sh MODEL_DIR NAME}
[ -f "$model_dir/config.json" ] || { echo "stage-model: $model_dir has no config.json (not a model directory)" >&2; exit 2; }
out=.gpu/model-$name
rm -rf "$out" && mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -cf "$tmp/model.tar" -C "$(dirname "$model_dir")" --transform "s,^$(basename "$model_dir"),$name," "$(basename "$model_dir")"
sha=$(sha256sum "$tmp/model.tar" | cut -d' ' -f1)
split -b "${PART_MIB:-56}M" -d -a 2 "$tmp/model.tar" "$tmp/p"
total=$(ls "$tmp"/p?? | wc -l)
for f in "$tmp"/p??; do
  p=$(basename "$f")
  mkdir -p "$out/$p"
  mv "$f" "$out/$p/chunk"
  echo "$total $sha" >"$out/$p/manifest"
  echo "call: carry [\"$out/$p\"]  command: bash scripts/stage-model.sh --receive $name $p"
done
