#!/usr/bin/env bash
# End-to-end check on a machine with a real NVIDIA GPU (no Podman needed):
#
#   bash scripts/gpu-check.sh            # from the repo root
#   bash scripts/gpu-check.sh --executor podman [--image localhost/my-torch:latest]
#                                        # the same through the Podman executor: the image
#                                        # (default_image otherwise) must have torch, and a
#                                        # CDI spec (nvidia-ctk cdi generate) must exist
#
# 1. NVML sees at least one NVIDIA GPU (otherwise: "FAIL: no NVIDIA GPU", exit 2);
# 2. gpud's dependencies import; if they do not and .whl/*.whl exists (made here by
#    scripts/build-device-wheels.sh), they are installed with `pip install --target
#    .whl/site` first. PYTHONPATH gets the repo and .whl/site: nothing is installed;
# 3. `gpud serve --gpus auto` starts on a temporary data dir and socket (real NVML). Jobs
#    run as the invoking user, or as `nobody` when run as root, with this Python
#    (GPUD_PYTHON), which must be able to import torch as that user;
# 4. `gpud gpus` shows real NVML data: not fake, UUIDs of the form GPU-xxxxxxxx-..., the
#    same UUIDs NVML reports;
# 5. a torch function with gpu="any" returns torch's UUID of cuda:0 and its
#    CUDA_VISIBLE_DEVICES, and the job saw exactly the GPU it was assigned: the one UUID
#    in its `gpus` (from `gpud ps --all --json`) equals both, and torch counts 1 device.
# 2b. (#13, before the daemon starts) scripts/gpu_ckpt_check.py: a child holding
#    GPU_CKPT_GIB GiB (default 8) is parked and unparked with gpud.cudackpt; NVML shows the
#    memory freed, its checksum is intact; park/unpark seconds and GB/s against the PCIe
#    limit are printed (bounded to ~3 minutes); the daemon's log then says "GPU
#    checkpointing: available".
# 6. (#13) scripts/gpu_preempt_check.py: with preempt_after 3s, a priority-0 torch loop
#    holding GPU_PREEMPT_GIB GiB (default 4) is suspended for a priority-10 job (its GPU
#    state parked: NVML shows the memory freed, no progress meanwhile), which succeeds;
#    the loop then resumes and finishes with the right checksum (bounded to ~4 minutes).
# 7. (#13) scripts/gpu_park_check.py: a keep_warm torch function holding GPU_PARK_GIB GiB
#    (default 8) is parked when another job needs its GPU (NVML shows the memory freed);
#    the next call unparks the same process (start_kind "unparked") with its checksum
#    intact in < 2 s, against a cold call loading the same state; park/unpark seconds and
#    GB/s against the PCIe limit are printed from the daemon's log (bounded to ~4 minutes).
#
# Prints PASS/FAIL lines; exits 0 only when every check passed. The daemon is stopped,
# its jobs killed and the temporary directory removed on exit, also on Ctrl-C.
#
# Environment: PYTHON (default python3: the interpreter with torch), JOB_PYTHON (the
# interpreter jobs run with when run as root; default: PYTHON's own), GPU_CHECK_TIMEOUT
# (seconds to wait for the job, default 180). GPU_CHECK_NO_GPU_GATE=1 skips step 1, to
# exercise the rest of this script on a machine without a GPU (the GPU checks then FAIL).
set -uo pipefail

EXECUTOR=process
IMAGE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --executor) EXECUTOR="${2:-}"; shift 2 ;;
    --image) IMAGE="${2:-}"; shift 2 ;;
    -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$EXECUTOR" in process|podman) ;; *) echo "--executor process|podman" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
JOB_TIMEOUT="${GPU_CHECK_TIMEOUT:-180}"
export PYTHONPATH="$REPO:$REPO/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
info() { echo "      $*"; }
# check_script SECONDS SCRIPT ARGS...: runs one of the Python checks (scripts/gpu_*_check.py),
# bounded to SECONDS, and counts its PASS/FAIL lines; an exit without a FAIL line is one.
check_script() {
  local secs="$1" script="$2" out rc
  shift 2
  echo "----- scripts/$script"
  out="$(timeout "$secs" "$PY" "$REPO/scripts/$script" "$@" 2>&1)"
  rc=$?
  echo "$out"
  passed=$((passed + $(echo "$out" | grep -c '^PASS:')))
  failed=$((failed + $(echo "$out" | grep -c '^FAIL:')))
  if [ $rc -ne 0 ] && ! echo "$out" | grep -q '^FAIL:'; then
    fail "scripts/$script exited $rc without a FAIL line (timed out?)"
  fi
}

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "FAIL: no Python: $PY not found (set PYTHON=/path/to/python3)"
  exit 1
fi

# -- 1. is there an NVIDIA GPU at all? ----------------------------------------------------
nvml_out="$(timeout 30 "$PY" - 2>&1 <<'EOF'
try:
    import pynvml
except ImportError as e:
    raise SystemExit(f"no NVML bindings (nvidia-ml-py) for this Python: {e}")
try:
    pynvml.nvmlInit()
except pynvml.NVMLError as e:
    raise SystemExit(f"NVML could not start: {e} (no NVIDIA driver?)")
n = pynvml.nvmlDeviceGetCount()
if n == 0:
    raise SystemExit("NVML found no devices")
for i in range(n):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    name = pynvml.nvmlDeviceGetName(h)
    uuid = pynvml.nvmlDeviceGetUUID(h)
    print(f"{i} {uuid} {name.decode() if isinstance(name, bytes) else name}")
EOF
)"
nvml_rc=$?
if [ $nvml_rc -ne 0 ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && smi="$(timeout 30 nvidia-smi -L 2>&1)"; then
    nvml_out="$smi"
    info "NVML from Python failed ($nvml_out); nvidia-smi -L:"
    echo "$smi" | sed 's/^/      /'
  elif [ "${GPU_CHECK_NO_GPU_GATE:-}" = 1 ]; then
    echo "FAIL: no NVIDIA GPU: ${nvml_out:-NVML timed out} (GPU_CHECK_NO_GPU_GATE=1: going on)"
    failed=$((failed + 1))
    nvml_out=""
  else
    [ $nvml_rc -eq 124 ] && nvml_out="NVML did not answer within 30 s"
    echo "FAIL: no NVIDIA GPU: $nvml_out"
    command -v nvidia-smi >/dev/null 2>&1 || echo "      (and nvidia-smi is not installed)"
    exit 2
  fi
else
  pass "NVML sees $(echo "$nvml_out" | wc -l) GPU(s)"
  echo "$nvml_out" | sed 's/^/      /'
fi
NVML_UUIDS="$(echo "$nvml_out" | grep -oE 'GPU-[0-9a-fA-F-]{36}' | sort -u | tr '\n' ' ')"

# -- 2. gpud's dependencies -----------------------------------------------------------------
deps_ok() {
  "$PY" -c 'import trio, hypercorn, msgspec, starlette, httpx, cloudpickle, click, rich, pynvml
import gpud, gpud_client' 2>&1
}
if ! err="$(deps_ok)"; then
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    info "installing .whl/*.whl into .whl/site"
    if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$REPO/.whl/site" "$REPO"/.whl/*.whl; then
      echo "FAIL: could not install the wheels in .whl/"
      exit 1
    fi
  fi
  if ! err="$(deps_ok)"; then
    echo "FAIL: gpud's dependencies do not import with $PY: $(echo "$err" | tail -1)"
    echo "      (run scripts/build-device-wheels.sh where pip works and carry .whl/ here)"
    exit 1
  fi
fi
pass "gpud and its dependencies import with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# -- 2b. CUDA checkpoint (#13): park and unpark a process holding GPU memory ---------------
check_script 200 gpu_ckpt_check.py --gib "${GPU_CKPT_GIB:-8}" --timeout 170
echo "-----"

# -- 3. the daemon ----------------------------------------------------------------------------
BASE="$(mktemp -d /tmp/gpud-gpucheck-XXXXXX)"
chmod 0755 "$BASE"  # a root daemon's jobs run as nobody, who must traverse it
DAEMON_PID=""

cleanup() {
  trap - EXIT INT TERM
  if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
    kill -TERM "$DAEMON_PID" 2>/dev/null
    for _ in $(seq 1 150); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DAEMON_PID" 2>/dev/null
    wait "$DAEMON_PID" 2>/dev/null
  fi
  # Jobs outlive a stopped daemon by design: kill the ones this daemon started (by the
  # instance id in their environment), then remove everything.
  if [ -f "$BASE/data/instance" ]; then
    "$PY" - "$(cat "$BASE/data/instance")" <<'EOF' 2>/dev/null
import os, signal, sys
want = f"GPUD_INSTANCE={sys.argv[1]}".encode()
for e in os.scandir("/proc"):
    if e.name.isdigit():
        try:
            with open(f"/proc/{e.name}/environ", "rb") as fh:
                if want in fh.read().split(b"\0"):
                    os.killpg(int(e.name), signal.SIGKILL)
        except OSError:
            pass
EOF
  fi
  rm -rf "$BASE"
}
finish() {
  cleanup
  echo "gpu-check: $passed passed, $failed failed"
  [ "$failed" -eq 0 ] && exit 0 || exit 1
}
trap cleanup EXIT
trap 'echo "interrupted"; cleanup; exit 130' INT TERM

SOCK="$BASE/gpud.sock"
export GPUD_URL="unix://$SOCK"
# Not resolved through links: a venv's python must stay the venv's.
JOB_PY="${JOB_PYTHON:-$("$PY" -c 'import sys; print(sys.executable)')}"
serve_env=(GPUD_DATA_DIR="$BASE/data" GPUD_SOCKET="$SOCK" GPUD_GPUS=auto GPUD_KILL_GRACE=2
           GPUD_GPU_POLL_INTERVAL=1 GPUD_PREEMPT_AFTER=3s)
if [ "$EXECUTOR" = podman ]; then
  serve_env+=(GPUD_EXECUTOR=podman GPUD_PODMAN_START_SERVICE=1)
  [ -n "$IMAGE" ] && serve_env+=(GPUD_DEFAULT_IMAGE="$IMAGE")
  JOB_USER="${GPUD_JOB_USER:-nobody}"
  [ "$(id -u)" = 0 ] && serve_env+=(GPUD_JOB_USER="$JOB_USER")
  if ls /etc/cdi/* /var/run/cdi/* 2>/dev/null | xargs -r grep -l "nvidia.com/gpu" >/dev/null 2>&1; then
    pass "a CDI spec for NVIDIA GPUs exists"
  else
    fail "no CDI spec for NVIDIA GPUs: run nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
  fi
elif [ "$(id -u)" = 0 ]; then
  JOB_USER="${GPUD_JOB_USER:-nobody}"
  serve_env+=(GPUD_JOB_USER="$JOB_USER" GPUD_PYTHON="$JOB_PY")
  # The job user must be able to run this Python and import torch with it.
  if err="$(timeout 120 "$PY" - "$JOB_PY" "$JOB_USER" 2>&1 <<'EOF'
import pwd, subprocess, sys
pw = pwd.getpwnam(sys.argv[2])
try:
    r = subprocess.run([sys.argv[1], "-c", "import torch"], user=pw.pw_uid,
                       group=pw.pw_gid, extra_groups=[], cwd="/", capture_output=True,
                       text=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": pw.pw_dir})
except OSError as e:
    raise SystemExit(f"{type(e).__name__}: {e}")
if r.returncode:
    raise SystemExit((r.stderr or r.stdout).strip().splitlines()[-1])
EOF
)"; then
    pass "job user $JOB_USER can import torch with $JOB_PY"
  else
    fail "job user $JOB_USER cannot import torch with $JOB_PY: $err"
  fi
else
  JOB_USER="$(id -un)"
fi

env "${serve_env[@]}" "$PY" -m gpud serve --gpus auto >"$BASE/daemon.log" 2>&1 &
DAEMON_PID=$!
started=0
for _ in $(seq 1 600); do
  if grep -q "gpud serving on" "$BASE/daemon.log" 2>/dev/null; then started=1; break; fi
  kill -0 "$DAEMON_PID" 2>/dev/null || break
  sleep 0.1
done
if [ $started = 0 ]; then
  fail "gpud serve did not start; its log:"
  sed 's/^/      /' "$BASE/daemon.log"
  finish
fi
pass "gpud serve started (jobs as $JOB_USER): $(grep -o 'gpud serving on.*' "$BASE/daemon.log")"
if grep -q "GPU checkpointing: available" "$BASE/daemon.log"; then
  pass "the daemon found GPU checkpointing: $(grep -o 'GPU checkpointing: .*' "$BASE/daemon.log")"
else
  fail "the daemon did not find GPU checkpointing: $(grep -o 'GPU checkpointing: .*' "$BASE/daemon.log")"
fi
if grep -q "GPUs: nvml" "$BASE/daemon.log"; then
  pass "the daemon's GPU inventory is NVML"
else
  fail "the daemon's GPU inventory is not NVML: $(grep -oE 'GPUs: [a-z]+' "$BASE/daemon.log")"
  grep -E "WARNING|ERROR" "$BASE/daemon.log" | sed 's/^/      /'
fi

# -- 4. gpud gpus -------------------------------------------------------------------------------
echo "----- gpud gpus"
timeout 60 "$PY" -m gpud gpus
echo "-----"
if timeout 60 "$PY" -m gpud gpus --json >"$BASE/gpus.json"; then
  if out="$(NVML_UUIDS="$NVML_UUIDS" "$PY" - "$BASE/gpus.json" 2>&1 <<'EOF'
import json, os, re, sys

data = json.load(open(sys.argv[1]))
gpus = data["gpus"] if isinstance(data, dict) else data
nvml = set(os.environ["NVML_UUIDS"].split())
uuid_re = r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
problems = [] if gpus else ["no GPUs listed"]
for g in gpus:
    i, uuid = g["index"], g["uuid"]
    if g["fake"]:
        problems.append(f"GPU {i} is fake")
    if not re.fullmatch(uuid_re, uuid):
        problems.append(f"GPU {i} UUID {uuid!r} is not an NVIDIA GPU UUID")
    if nvml and uuid not in nvml:
        problems.append(f"GPU {i} UUID {uuid} is not one NVML reports")
    if not g["memory_total"] > 0:
        problems.append(f"GPU {i} has no memory_total")
print("; ".join(problems) or ", ".join(f"{g['index']}: {g['name']} {g['uuid']}" for g in gpus))
sys.exit(1 if problems else 0)
EOF
)"; then
    pass "gpud gpus shows real NVML GPUs: $out"
  else
    fail "gpud gpus: $out"
  fi
else
  fail "gpud gpus --json failed"
fi

# -- 5. a torch job on gpu="any" -------------------------------------------------------------
job_out="$(timeout $((JOB_TIMEOUT + 60)) "$PY" - "$JOB_TIMEOUT" 2>&1 <<'EOF'
import json, sys

import gpud_client as gpud


@gpud.function(gpu="any", timeout=600, name="gpu-check.torch_uuid")
def torch_uuid():
    import os
    import uuid

    import torch

    u = torch.cuda.get_device_properties(0).uuid  # a UUID object, without "GPU-"
    text = str(u)
    if not text.startswith(("GPU-", "MIG-")):
        try:
            text = str(uuid.UUID(text))  # canonical: lower case, dashed
        except ValueError:
            pass
        text = "GPU-" + text
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    return {
        "uuid": text,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_count": torch.cuda.device_count(),
        "name": torch.cuda.get_device_name(0),
        "sum": float(x.sum().item()),
        "torch": torch.__version__,
    }


handle = torch_uuid.spawn()
try:
    value = handle.get(timeout=float(sys.argv[1]))
    print(json.dumps({"job_id": handle.id, "value": value}))
except TimeoutError as e:
    info = handle.status()
    print(json.dumps({"job_id": handle.id, "error": f"{e}; reason: {info.reason}"}))
    handle.cancel_quietly()
except Exception as e:  # the job's own exception, re-raised here
    print(json.dumps({"job_id": handle.id, "error": f"{type(e).__name__}: {e}"}))
EOF
)"
job_rc=$?
job_line="$(echo "$job_out" | grep -E '^\{"job_id"' | tail -1)"
if [ -z "$job_line" ]; then
  fail "could not run the torch job (exit $job_rc): $(echo "$job_out" | tail -5)"
  finish
fi
if ! timeout 60 "$PY" -m gpud ps --all --json >"$BASE/ps.json"; then
  fail "gpud ps --all --json failed"
  echo "[]" >"$BASE/ps.json"
fi
check_out="$(JOB_LINE="$job_line" NVML_UUIDS="$NVML_UUIDS" "$PY" - "$BASE/ps.json" 2>&1 <<'EOF'
import json, os, sys

job = json.loads(os.environ["JOB_LINE"])
jobs = json.load(open(sys.argv[1]))
jobs = jobs["jobs"] if isinstance(jobs, dict) else jobs
info = next((j for j in jobs if j["id"] == job["job_id"]), None)
ok = True


def out(good, text):
    global ok
    ok = ok and good
    print(("PASS: " if good else "FAIL: ") + text)


if info is None:
    out(False, f"job {job['job_id']} is not in gpud ps --all --json")
    sys.exit(1)
state = f"job {info['id']} {info['state']}"
if info["error"]:
    state += f": {info['error']}"
if "error" in job:
    state += f" ({job['error']})"
out(info["state"] == "succeeded", state)
if "error" in job:
    sys.exit(1)
v = job["value"]
print(f"      torch {v['torch']} on {v['name']}: uuid {v['uuid']}, "
      f"CUDA_VISIBLE_DEVICES={v['cuda_visible_devices']}, {v['device_count']} device(s)")
assigned = info["gpus"]
out(len(assigned) == 1,
    f"the job was assigned exactly one GPU: {assigned} (indices {info['gpu_indices']})")
if assigned:
    out(v["uuid"] == assigned[0], f"torch sees the assigned GPU: {v['uuid']} == {assigned[0]}")
    out(v["cuda_visible_devices"] == assigned[0],
        f"CUDA_VISIBLE_DEVICES is the assigned GPU: {v['cuda_visible_devices']} == {assigned[0]}")
nvml = set(os.environ["NVML_UUIDS"].split())
if nvml:
    out(v["uuid"] in nvml, f"torch's UUID {v['uuid']} is one NVML reports")
out(v["device_count"] == 1, f"torch counts exactly one CUDA device: {v['device_count']}")
out(v["sum"] == 1023 * 1024 / 2, f"a CUDA computation gave the right answer: {v['sum']}")
sys.exit(0 if ok else 1)
EOF
)"
echo "$check_out"
passed=$((passed + $(echo "$check_out" | grep -c '^PASS:')))
failed=$((failed + $(echo "$check_out" | grep -c '^FAIL:')))
if ! echo "$check_out" | grep -qE '^(PASS|FAIL):'; then
  fail "checking the job failed: $check_out"
fi

# -- 6. preemption (#13): a priority-0 torch loop is suspended (GPU state parked) for a
#    priority-10 job, then resumes and finishes with the right checksum --------------------
check_script 300 gpu_preempt_check.py --gib "${GPU_PREEMPT_GIB:-4}" --timeout 240

# -- 7. parking (#13): an idle keep_warm torch worker holding GPU_PARK_GIB GiB is parked when
#    another job needs its GPU, and the next call unparks it with its tensor intact --------
check_script 300 gpu_park_check.py --gib "${GPU_PARK_GIB:-8}" --log "$BASE/daemon.log" \
  --timeout 240
echo "-----"
if [ "$failed" -ne 0 ]; then
  echo "----- daemon log (last 30 lines)"
  tail -30 "$BASE/daemon.log"
fi
finish
