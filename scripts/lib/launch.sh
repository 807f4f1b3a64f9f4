# Sourced by the presets in scripts/. Sets ROOT (the repository) and splits the preset's arguments into
# ACCELERATE_CONFIG (--accelerate_config FILE; default: one GPU in fp16, as the paper ran, or the preset's
# PRESET_ACCELERATE_CONFIG file in accelerate_configs/) and ARGS, the flags
# handed on to the entry point after the preset's own, so a flag given here overrides the preset's (argparse
# keeps the last occurrence). Paths stay relative to where the preset is called from.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ACCELERATE_CONFIG="$ROOT/accelerate_configs/${PRESET_ACCELERATE_CONFIG:-1gpu_fp16.yaml}"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --accelerate_config) ACCELERATE_CONFIG="${2:?--accelerate_config needs a file}"; shift 2 ;;
    --accelerate_config=*) ACCELERATE_CONFIG="${1#*=}"; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ ! -f "$ACCELERATE_CONFIG" ]; then
  echo "accelerate config $ACCELERATE_CONFIG does not exist; pass --accelerate_config accelerate_configs/<file>.yaml" >&2
  exit 2
fi
