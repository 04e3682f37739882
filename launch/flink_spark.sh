#!/usr/bin/env bash
# Curate a corpus on an Apache Flink or Apache Spark cluster: the Beam pipeline of
# `python -m data.prepare --runner=...` (data/curation) through Beam's portable runners.
#
#   launch/flink_spark.sh image IMAGE                  # build + push the workers' SDK container
#   launch/flink_spark.sh flink HOST:PORT IMAGE INPUT OUTPUT [--config.x=y ...] [Beam options ...]
#   launch/flink_spark.sh spark spark://HOST:7077 IMAGE INPUT OUTPUT [--config.x=y ...] [Beam options ...]
#
#   e.g. launch/flink_spark.sh flink flink-jobmanager:8081 registry/codelm-beam:1 \
#          'hdfs://data/the-stack/*.parquet' hdfs://data/curated --parallelism=64
#
# The launcher needs the Beam environment (`launch/dataflow.sh setup` makes .venv-beam) and Java
# for the runner's job server; Beam fetches the job-server jar for its version from Maven Central
# unless --flink_job_server_jar / --spark_job_server_jar names a local copy. Inputs and the output
# directory must be on a filesystem every worker reaches (HDFS, gs://, s3://, or a shared mount);
# the SDK container holds codelm's configs/ and data/ and launch/dataflow_requirements.txt.
set -euo pipefail
cmd=${1:?usage: $0 image IMAGE | flink MASTER IMAGE INPUT OUTPUT ... | spark MASTER IMAGE INPUT OUTPUT ...}; shift
root=$(git rev-parse --show-toplevel)
venv=${BEAM_VENV:-$root/.venv-beam}

case "$cmd" in
  image)
    image=${1:?IMAGE}
    context=$(mktemp -d)
    cp -r "$root/configs" "$root/data" "$root/launch/dataflow_requirements.txt" "$context/"
    cat > "$context/Dockerfile" <<'DOCKERFILE'
FROM apache/beam_python3.11_sdk:2.77.0
COPY dataflow_requirements.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/dataflow_requirements.txt
COPY configs /opt/codelm/configs
COPY data /opt/codelm/data
ENV PYTHONPATH=/opt/codelm
DOCKERFILE
    docker build -t "$image" "$context" && docker push "$image" ;;
  flink|spark)
    master=${1:?MASTER}; image=${2:?IMAGE}; input=${3:?INPUT}; output=${4:?OUTPUT}; shift 4
    if [[ $cmd == flink ]]; then runner=(--runner=FlinkRunner --flink_master="$master")
    else runner=(--runner=SparkRunner --spark_master_url="$master"); fi
    cd "$root"
    "$venv/bin/python" -m data.prepare "${runner[@]}" --input="$input" --output_dir="$output" \
      --environment_type=DOCKER --environment_config="$image" "$@" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
