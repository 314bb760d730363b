# ---------------------------------------------------------------------------
# Base of every generated script (builder/templates/deploy-base.sh).
# ---------------------------------------------------------------------------
# shellcheck disable=SC2034,SC2317
{
PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
export LC_ALL=C
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umask 022

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
say() { printf '%s: %s\n' "$PROG" "$*"; }
# A value as it may be shown in a message: control characters replaced.
shown() { printf "'%s'" "${1//[[:cntrl:]]/?}"; }

# run CMD...: run it, or print it with --dry-run (DRY_RUN=1).
run() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        printf '%s: would run:' "$PROG"
        printf ' %q' "$@"
        printf '\n'
        return 0
    fi
    "$@"
}

# Absolute paths of plain characters (the same rule as builder/values.py).
PATH_RE='^/[A-Za-z0-9._+@%=:,/-]*$'
is_path() { [[ $1 =~ $PATH_RE && "$1/" != *"/../"* ]]; }

# ko_vermagic FILE: REPLY=the kernel release a module was built for (or empty)
ko_vermagic() {
    local v=""
    if command -v modinfo >/dev/null 2>&1; then v=$(modinfo -F vermagic -- "$1" 2>/dev/null) || v=""; fi
    if [[ -z $v ]]; then v=$(grep -a -o -m1 -- 'vermagic=[^[:cntrl:]]*' "$1" 2>/dev/null) || v=""; v=${v#vermagic=}; fi
    v=${v%%$'\n'*}
    REPLY=${v%% *}
}
}
