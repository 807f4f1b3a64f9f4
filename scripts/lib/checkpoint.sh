# Sourced by the validation presets: the first argument is the checkpoint to evaluate (CHECKPOINT), the rest
# goes to lib/launch.sh.
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: $0 CHECKPOINT [--accelerate_config FILE] [flags of the validation script]" >&2
  exit 2
fi
CHECKPOINT="$1"
shift
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
