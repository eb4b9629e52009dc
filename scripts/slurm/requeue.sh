# Sourced by the sbatch scripts in this folder (bash): run the training step in the background, pass SLURM's
# preemption notice on to it, and requeue the job when the run stopped early with its checkpoint saved.
#
#   run_requeueable CMD...   runs CMD (an srun line), waits for it, requeues if needed, returns its status
#   seconds_left             seconds to the job's time limit (empty if unlimited)
#
# Why each part (docs/cluster.md, "Preemption and requeue"):
# - `#SBATCH --signal=B:USR1@300` sends USR1 to this batch shell only, 300 s before the time limit. bash runs
#   a trap only between commands, so the step runs in the background and the shell waits on it; the trap
#   passes USR1 to srun, which forwards it to its tasks (accelerate launch on each node, whose elastic agent
#   forwards it to every train.py process when SIGUSR1 is in TORCHELASTIC_SIGNALS_TO_HANDLE).
# - A preemption by the scheduler (PreemptMode=REQUEUE/CANCEL, GraceTime) sends SIGTERM to every process of
#   the job itself: the shell only notes it (a second TERM would reach train.py twice).
# - train.py exits 75 ("preempted; checkpoint saved") after such a signal or its --time-limit. A launcher
#   that starts several processes (accelerate launch, torchrun) reports its workers' 75 as 1, or 128 + the
#   signal, so after a notice any status but 0 (finished) and 2 (bad arguments: a requeue fails the same way)
#   requeues too. The requeued job starts with `--resume latest`; REQUEUE_MAX bounds a crash loop.
PREEMPTED_STATUS=75
REQUEUE_MAX=${REQUEUE_MAX:-50}
PREEMPT_NOTICE=0

_log() { echo "$(date '+%F %T') ${SLURM_JOB_ID:-nojob}: $*" >&2; }

_should_requeue() {  # status notice -> 0 when the job is to be requeued
    local rc=$1 notice=$2
    [[ $rc -eq $PREEMPTED_STATUS ]] && return 0
    [[ $notice -eq 1 && $rc -ne 0 && $rc -ne 2 ]] && return 0
    return 1
}

_STEP_PID=
_FORWARDED=0
_notice() {  # the USR1 trap: note the notice, pass it on once the step runs
    PREEMPT_NOTICE=1
    if [[ -n $_STEP_PID && $_FORWARDED -eq 0 ]]; then
        _FORWARDED=1
        _log "USR1: preemption notice, passed on to the job step"
        kill -USR1 "$_STEP_PID" 2>/dev/null
    fi
}

# set when this file is sourced: a notice that comes before or while the step starts is not lost (bash's
# default for USR1 is to exit)
trap _notice USR1
trap '_log "TERM: preempted by the scheduler"; PREEMPT_NOTICE=1' TERM

run_requeueable() {
    local rc
    if [[ $PREEMPT_NOTICE -eq 1 ]]; then  # the notice came before the step: it is not started
        _log "preemption notice before the job step started: not started"
        rc=$PREEMPTED_STATUS
    else
        "$@" &
        _STEP_PID=$!
        local pid=$_STEP_PID
        [[ $PREEMPT_NOTICE -eq 1 ]] && _notice  # came between the fork and the line above
        while true; do
            wait "$pid"
            rc=$?
            if ! kill -0 "$pid" 2>/dev/null; then  # ended (else wait returned for a trap: wait again)
                wait "$pid" 2>/dev/null            # the status, if it ended while a trap ran (127: reaped above)
                local again=$?
                [[ $again -ne 127 ]] && rc=$again
                break
            fi
        done
    fi
    trap - USR1 TERM
    if _should_requeue "$rc" "$PREEMPT_NOTICE"; then
        if [[ ${SLURM_RESTART_COUNT:-0} -ge $REQUEUE_MAX ]]; then
            _log "step ended with status $rc; not requeued: already requeued $REQUEUE_MAX times (REQUEUE_MAX)"
        else
            _log "step ended with status $rc; requeueing (the next start resumes the latest checkpoint)"
            scontrol requeue "$SLURM_JOB_ID" || _log "scontrol requeue failed; resubmit this script to continue"
        fi
    else
        _log "step ended with status $rc"
    fi
    return "$rc"
}

seconds_left() {  # seconds until this job's time limit (squeue's [D-]HH:MM:SS); empty when unlimited or unknown
    local left d=0 h=0 m=0 s=0
    left=$(squeue -h -j "${SLURM_JOB_ID:-}" -o %L 2>/dev/null) || return 0
    [[ $left =~ ^(([0-9]+)-)?(([0-9]+):)?(([0-9]+):)?([0-9]+)$ ]] || return 0
    d=${BASH_REMATCH[2]:-0}
    if [[ -n ${BASH_REMATCH[5]} ]]; then h=${BASH_REMATCH[4]}; m=${BASH_REMATCH[6]}
    else m=${BASH_REMATCH[4]:-0}; fi
    s=${BASH_REMATCH[7]}
    echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}
