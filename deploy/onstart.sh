#!/usr/bin/env bash
# geotrain on-start script for rented GPU hosts (vast.ai "on-start script", RunPod start command,
# or any container/VM): installs geotrain if missing, then runs `worker` in a restart loop with
# exponential backoff until it exits 0 (run finished), 2 (bad flags) or 3 (refused by the
# coordinator), or this script gets SIGTERM/SIGINT (forwarded to the worker, which leaves cleanly).
# The worker also reads GEOTRAIN_<OPTION> variables itself; this script adds provider defaults.
#
# Settings (environment):
#   GEOTRAIN_COORDINATOR       HOST:PORT of the coordinator (required)
#   GEOTRAIN_TOKEN             shared token; written to a 0600 file and passed as --token-file
#   GEOTRAIN_TOKEN_FILE        ... or an existing token file (wins over GEOTRAIN_TOKEN)
#   GEOTRAIN_PORT              worker gRPC port inside the container (default 10000)
#   GEOTRAIN_METRICS_PORT      worker /metrics port (default 9100; 0 = off)
#   GEOTRAIN_NAME              worker name (default: provider instance id, else hostname)
#   GEOTRAIN_ADVERTISE_HOST    address the coordinator and peers should dial; defaults to the
#                              provider's public IP (vast.ai PUBLIC_IPADDR, RunPod RUNPOD_PUBLIC_IP)
#   GEOTRAIN_ADVERTISE_PORT    external port mapped to GEOTRAIN_PORT; defaults to the provider's
#                              mapping (vast.ai VAST_TCP_PORT_<port>, RunPod RUNPOD_TCP_PORT_<port>)
#   GEOTRAIN_WORKER_ARGS       extra worker flags, split on whitespace
#   GEOTRAIN_PIP_SPEC          what to pip-install when `worker` is missing (wheel path or URL,
#                              VCS URL, or directory); default: the checkout this script sits in
#   GEOTRAIN_VENV              where to install (default /opt/geotrain/venv; made with
#                              --system-site-packages so the image's CUDA torch is reused)
#   GEOTRAIN_BACKOFF_MIN/_MAX  restart backoff bounds in seconds (default 5 / 300)
#
# If the provider expects the on-start script to return, launch it in the background:
#   nohup bash onstart.sh >>/var/log/geotrain-worker.log 2>&1 &
set -euo pipefail

log() { printf '%s onstart: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { log "error: $*"; exit 2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

coordinator=${GEOTRAIN_COORDINATOR:-}
[[ -n $coordinator ]] || die "GEOTRAIN_COORDINATOR (HOST:PORT) is not set"
[[ $coordinator == *:* ]] || die "GEOTRAIN_COORDINATOR must be HOST:PORT, got '$coordinator'"

port=${GEOTRAIN_PORT:-10000}
metrics_port=${GEOTRAIN_METRICS_PORT:-9100}
[[ $port =~ ^[0-9]+$ ]] || die "GEOTRAIN_PORT must be a number, got '$port'"
[[ $metrics_port =~ ^[0-9]+$ ]] || die "GEOTRAIN_METRICS_PORT must be a number, got '$metrics_port'"
backoff_min=${GEOTRAIN_BACKOFF_MIN:-5}
backoff_max=${GEOTRAIN_BACKOFF_MAX:-300}
[[ $backoff_min =~ ^[0-9]+$ && $backoff_max =~ ^[0-9]+$ ]] || die "GEOTRAIN_BACKOFF_MIN/_MAX must be whole seconds"
(( backoff_min >= 1 )) || backoff_min=1
(( backoff_max >= backoff_min )) || backoff_max=$backoff_min

# Provider port mapping: the external port for our internal one, e.g. VAST_TCP_PORT_10000.
vast_port_var="VAST_TCP_PORT_${port}"
runpod_port_var="RUNPOD_TCP_PORT_${port}"
advertise_host=${GEOTRAIN_ADVERTISE_HOST:-${PUBLIC_IPADDR:-${RUNPOD_PUBLIC_IP:-}}}
advertise_port=${GEOTRAIN_ADVERTISE_PORT:-${!vast_port_var:-${!runpod_port_var:-}}}
if [[ -n $advertise_port && -z $advertise_host ]]; then
    log "warning: an advertise port ($advertise_port) but no advertise host; the coordinator will use the address it sees"
fi
if [[ -n $advertise_host && -z $advertise_port ]]; then
    advertise_port=$port
    log "no port mapping found for $port; advertising $advertise_host:$advertise_port (same port outside)"
fi

name=${GEOTRAIN_NAME:-${VAST_CONTAINERLABEL:-${RUNPOD_POD_ID:-$(hostname)}}}

# ---- install geotrain if missing -----------------------------------------------------------------
venv=${GEOTRAIN_VENV:-/opt/geotrain/venv}
if [[ -x $venv/bin/worker ]]; then
    export PATH="$venv/bin:$PATH"
fi
if ! command -v worker >/dev/null 2>&1; then
    spec=${GEOTRAIN_PIP_SPEC:-}
    if [[ -z $spec ]]; then
        if [[ -f $script_dir/../pyproject.toml ]] && grep -q '^name = "geotrain"' "$script_dir/../pyproject.toml"; then
            spec=$(cd "$script_dir/.." && pwd)
        else
            die "worker is not installed and GEOTRAIN_PIP_SPEC is not set (a wheel, VCS URL or directory)"
        fi
    fi
    python=$(command -v python3 || command -v python || true)
    [[ -n $python ]] || die "no python3 on this host"
    log "installing geotrain from $spec into $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$spec"
    export PATH="$venv/bin:$PATH"
fi
command -v worker >/dev/null 2>&1 || die "worker still not on PATH after installing"

# ---- token ---------------------------------------------------------------------------------------
token_file=${GEOTRAIN_TOKEN_FILE:-}
if [[ -z $token_file && -n ${GEOTRAIN_TOKEN:-} ]]; then
    token_dir=${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}
    token_file=$(umask 077 && mktemp "$token_dir/geotrain-token.XXXXXX")
    printf '%s' "$GEOTRAIN_TOKEN" >"$token_file"
    trap 'rm -f "$token_file"' EXIT
fi
unset GEOTRAIN_TOKEN # keep it out of the worker's environment (and /proc/PID/environ)
if [[ -n $token_file && ! -r $token_file ]]; then
    die "token file $token_file is not readable"
fi

# ---- command line ----------------------------------------------------------------------------------
args=(--port "$port" --coordinator "$coordinator" --name "$name" --metrics-port "$metrics_port")
if [[ -n $advertise_host ]]; then
    args+=(--advertise-host "$advertise_host" --advertise-port "$advertise_port")
fi
if [[ -n $token_file ]]; then
    args+=(--token-file "$token_file")
fi
if [[ -n ${GEOTRAIN_WORKER_ARGS:-} ]]; then
    read -r -a extra <<<"$GEOTRAIN_WORKER_ARGS"
    args+=("${extra[@]}")
fi

# ---- restart loop ------------------------------------------------------------------------------------
child=""
stopping=0
on_signal() {
    stopping=1
    log "received $1, stopping worker"
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null || true
    fi
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT

delay=$backoff_min
while :; do
    log "starting worker $name -> $coordinator (port $port, advertise ${advertise_host:-auto}:${advertise_port:-auto})"
    started=$SECONDS
    worker "${args[@]}" &
    child=$!
    status=0
    # `wait` returns early when a trapped signal arrives; wait again for the worker to finish.
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do
        wait "$child" || status=$?
    done
    child=""
    if (( stopping )); then
        log "worker stopped (status $status)"
        exit 0
    fi
    if (( status == 0 )); then
        log "worker finished"
        exit 0
    fi
    if (( status == 2 )); then
        die "worker rejected its configuration (exit 2); not restarting"
    fi
    if (( status == 3 )); then
        log "error: the coordinator refused this worker (bad token or protocol mismatch); not restarting"
        exit 3
    fi
    # A run that lasted a while resets the backoff: the failure is new, not a crash loop.
    if (( SECONDS - started > 600 )); then
        delay=$backoff_min
    fi
    log "worker exited with status $status; restarting in ${delay}s"
    sleep "$delay" &
    sleeper=$!
    wait "$sleeper" || true
    if (( stopping )); then
        kill "$sleeper" 2>/dev/null || true
        exit 0
    fi
    delay=$(( delay * 2 > backoff_max ? backoff_max : delay * 2 ))
done
