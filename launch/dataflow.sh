#!/usr/bin/env bash
# Curate a corpus on Google Cloud Dataflow: the Beam pipeline of `python -m data.prepare --runner=...`
# (data/curation), reading JSONL(.gz)/Parquet from Cloud Storage and writing ArrayRecord shards and
# report.json back to it. Directory-tree inputs are read on the workers, so they do not fit Dataflow;
# convert them to JSONL first (or run the local driver, without --runner).
#
#   launch/dataflow.sh setup                          # .venv-beam: launch/dataflow_requirements.txt + GCP I/O
#   launch/dataflow.sh run PROJECT REGION BUCKET INPUT OUTPUT [--config.x=y ...] [Dataflow options ...]
#
#   e.g. launch/dataflow.sh run my-project us-central1 my-bucket 'gs://my-bucket/the-stack/*.parquet' \
#          gs://my-bucket/curated --config.read.fields=text=content,path=path,repo=repo_name \
#          --max_num_workers=100 --machine_type=n2-highmem-4
#
# Workers run Beam's Python 3.11 SDK container (the launching interpreter's version must match) and
# install launch/dataflow_requirements.txt plus codelm's configs/ and data/ packages, built here as
# a source distribution. Every option data.prepare does not know goes to Beam unchanged.
set -euo pipefail
cmd=${1:?usage: $0 setup | run PROJECT REGION BUCKET INPUT OUTPUT [options...]}; shift
root=$(git rev-parse --show-toplevel)
venv=${BEAM_VENV:-$root/.venv-beam}

case "$cmd" in
  setup)
    python3.11 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$root/launch/dataflow_requirements.txt" 'apache-beam[gcp]==2.77.0' ;;
  run)
    project=${1:?PROJECT}; region=${2:?REGION}; bucket=${3:?BUCKET}; input=${4:?INPUT}; output=${5:?OUTPUT}; shift 5
    package=$(mktemp -d)
    cp -r "$root/configs" "$root/data" "$package/"
    cat > "$package/setup.py" <<'SETUP'
import setuptools

setuptools.setup(
    name="codelm-curation",
    version="0.0.0",
    packages=setuptools.find_namespace_packages(include=["configs", "configs.*", "data", "data.*"]),
)
SETUP
    cd "$root"
    "$venv/bin/python" -m data.prepare --runner=DataflowRunner --input="$input" --output_dir="$output" \
      --project="$project" --region="$region" \
      --temp_location="gs://$bucket/tmp" --staging_location="gs://$bucket/staging" \
      --setup_file="$package/setup.py" --requirements_file="$root/launch/dataflow_requirements.txt" \
      --job_name="codelm-curation-$(date +%Y%m%d-%H%M%S)" "$@" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
