# ---------------------------------------------------------------------------
# Common part of the DPU scripts (builder/templates/deploy-common.sh).
# Values above were validated and quoted by rootfs-build; offload.conf is
# parsed below as KEY=VALUE lines (never sourced) and validated again.
# ---------------------------------------------------------------------------
# (one block: not every script uses every function or variable of it)
# @BASE@
# shellcheck disable=SC2034,SC2317
{
one_line() {
    local s=${1//$'\n'/; }
    s=${s//[[:cntrl:]]/ }
    while [[ $s == *"  "* ]]; do s=${s//  / }; done
    printf '%s' "$s"
}

# --- value checks (the same rules as builder/values.py) ---------------------
is_port() { [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }
is_level() { [[ $1 =~ ^(NONE|ERROR|WARN|INFO|DEBUG)$ ]]; }
is_kernel() { [[ $1 =~ ^[A-Za-z0-9._+~-]+$ ]]; }
is_ipv4() {
    local o
    local -a parts
    [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
    IFS=. read -r -a parts <<<"$1"
    for o in "${parts[@]}"; do
        [[ $o == 0 || $o != 0* ]] || return 1
        ((10#$o <= 255)) || return 1
    done
}
is_ipv6() {
    local s=$1 last head g n=0
    local -a groups
    [[ $s =~ ^[0-9A-Fa-f:.]{2,45}$ && $s == *:* && $s != *:::* ]] || return 1
    [[ ${s#*::} != *::* ]] || return 1
    last=${s##*:} head=${s%:*}
    if [[ $last == *.* ]]; then is_ipv4 "$last" || return 1
    else [[ $last =~ ^[0-9A-Fa-f]{0,4}$ ]] || return 1; fi
    IFS=: read -r -a groups <<<"$head"
    for g in "${groups[@]}"; do
        [[ $g =~ ^[0-9A-Fa-f]{0,4}$ ]] || return 1
        n=$((n + 1))
    done
    ((n <= 8))
}
is_ip() { is_ipv4 "$1" || is_ipv6 "$1"; }

# --- offload.conf ------------------------------------------------------------
CONF_KEYS="ROOTFS ROOTFS_IMAGE ROOTFS_IMAGE_RO HOST_IP QTFS_SERVER_IP REXEC_PORT QMP_PORT"
CONF_KEYS+=" QTFS_LOG_LEVEL QTFS_KO DPU_KERNEL REXEC_TLS"
CFG_ROOTFS="" CFG_HOST_IP="" CFG_QTFS_SERVER_IP="" CFG_REXEC_PORT="" CFG_QMP_PORT=""
CFG_QTFS_LOG_LEVEL="" CFG_QTFS_KO="" CFG_DPU_KERNEL="" CFG_ROOTFS_IMAGE="" CFG_ROOTFS_IMAGE_RO=0
CFG_REXEC_TLS=0

# load_config FILE: strict KEY=VALUE lines; blank lines and '#' comments
# allowed; one optional pair of surrounding quotes is stripped; every value is
# checked, unknown or repeated keys are refused.  Errors are one line, exit 2.
load_config() {
    local file=$1 line key value n=0 at
    local -A seen=()
    [[ -f $file && -r $file ]] || die "config $(shown "$file") is not a readable file (see --config)"
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line%$'\r'}
        at="$file:$n"
        [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
        [[ $line =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]] ||
            die "$at: expected KEY=VALUE, got $(shown "$line")"
        key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
        [[ -z ${seen[$key]:-} ]] || die "$at: $key is set twice"
        seen[$key]=1
        case $key in
        ROOTFS)
            if ! is_path "$value" || [[ $value == / ]]; then
                die "$at: ROOTFS: $(shown "$value") is not an absolute path of plain characters (not /)"
            fi
            CFG_ROOTFS=$value ;;
        ROOTFS_IMAGE)
            if [[ -n $value ]] && { ! is_path "$value" || [[ $value == / ]]; }; then
                die "$at: ROOTFS_IMAGE: $(shown "$value") is not an absolute path of plain characters"
            fi
            CFG_ROOTFS_IMAGE=$value ;;
        ROOTFS_IMAGE_RO)
            [[ $value =~ ^[01]?$ ]] || die "$at: ROOTFS_IMAGE_RO: $(shown "$value") is not 0 or 1"
            CFG_ROOTFS_IMAGE_RO=${value:-0} ;;
        HOST_IP)
            is_ip "$value" || die "$at: HOST_IP: $(shown "$value") is not an IP address"
            CFG_HOST_IP=$value ;;
        QTFS_SERVER_IP)
            [[ -z $value ]] || is_ip "$value" ||
                die "$at: QTFS_SERVER_IP: $(shown "$value") is not an IP address"
            CFG_QTFS_SERVER_IP=$value ;;
        REXEC_PORT)
            is_port "$value" || die "$at: REXEC_PORT: $(shown "$value") is not a port number (1-65535)"
            CFG_REXEC_PORT=$((10#$value)) ;;
        QMP_PORT)
            is_port "$value" || die "$at: QMP_PORT: $(shown "$value") is not a port number (1-65535)"
            CFG_QMP_PORT=$((10#$value)) ;;
        QTFS_LOG_LEVEL)
            [[ -z $value ]] || is_level "$value" ||
                die "$at: QTFS_LOG_LEVEL: $(shown "$value") is not one of NONE ERROR WARN INFO DEBUG"
            CFG_QTFS_LOG_LEVEL=$value ;;
        QTFS_KO)
            [[ -z $value ]] || is_path "$value" ||
                die "$at: QTFS_KO: $(shown "$value") is not an absolute path of plain characters"
            CFG_QTFS_KO=$value ;;
        DPU_KERNEL)
            [[ -z $value ]] || is_kernel "$value" ||
                die "$at: DPU_KERNEL: $(shown "$value") is not a kernel release (uname -r)"
            CFG_DPU_KERNEL=$value ;;
        REXEC_TLS)
            [[ $value =~ ^[01]?$ ]] || die "$at: REXEC_TLS: $(shown "$value") is not 0 or 1"
            CFG_REXEC_TLS=${value:-0} ;;
        *) die "$at: unknown key $key (known: $CONF_KEYS)" ;;
        esac
    done <"$file"
    for key in ROOTFS HOST_IP REXEC_PORT QMP_PORT; do
        [[ -n ${seen[$key]:-} ]] || die "$file: $key is missing"
    done
    CFG_QTFS_SERVER_IP=${CFG_QTFS_SERVER_IP:-$CFG_HOST_IP}
    CFG_QTFS_LOG_LEVEL=${CFG_QTFS_LOG_LEVEL:-INFO}
}

# --- options shared by the scripts -------------------------------------------
ROOT_ARG="" CONFIG=$SCRIPT_DIR/offload.conf DRY_RUN=0 REHEARSE="" ROOT_MISSING_OK=0 FORCE=0
# parse_args ALLOWED "$@": ALLOWED lists the optional options (dry-run rehearse force)
parse_args() {
    local allowed=" $1 "
    shift
    while (($#)); do
        case $1 in
        -h | --help) usage; exit 0 ;;
        --root | --config | --rehearse)
            (($# >= 2)) || die "$1 needs a value (see --help)"
            set -- "$1=$2" "${@:3}"
            continue ;;
        --root=*) ROOT_ARG=${1#*=} ;;
        --config=*) CONFIG=${1#*=} ;;
        --dry-run)
            [[ $allowed == *" dry-run "* ]] || die "--dry-run is not an option of $PROG"
            DRY_RUN=1 ;;
        --rehearse=*)
            [[ $allowed == *" rehearse "* ]] || die "--rehearse is not an option of $PROG"
            REHEARSE=${1#*=}
            [[ -n $REHEARSE ]] || die "--rehearse needs a directory" ;;
        --force)
            [[ $allowed == *" force "* ]] || die "--force is not an option of $PROG"
            FORCE=1 ;;
        *) die "unknown argument $(shown "$1") (see --help)" ;;
        esac
        shift
    done
}

absolute() { if [[ $1 == /* ]]; then REPLY=$1; else REPLY=$PWD/$1; fi; }

# setup_root: ROOT = canonical rootfs directory (--root or ROOTFS); a missing
# one is an error unless ROOT_MISSING_OK=1.
setup_root() {
    local raw=${ROOT_ARG:-$CFG_ROOTFS}
    absolute "$raw"
    raw=$REPLY
    is_path "$raw" || die "rootfs $(shown "$raw") is not an absolute path of plain characters"
    if [[ ! -d $raw ]]; then
        [[ $ROOT_MISSING_OK == 1 ]] || die "rootfs $raw is not a directory (see --root / ROOTFS)"
        ROOT=$raw
        return 0
    fi
    ROOT=$(realpath -e -- "$raw") || die "cannot resolve $raw"
    is_path "$ROOT" || die "rootfs $(shown "$ROOT") is not a path of plain characters"
    [[ $ROOT != / ]] || die "the rootfs cannot be / (see --root / ROOTFS)"
}

# setup_image: IMAGE = canonical path of ROOTFS_IMAGE (or ""), outside ROOT.
IMAGE=""
setup_image() {
    IMAGE=""
    [[ -n $CFG_ROOTFS_IMAGE ]] || return 0
    IMAGE=$(realpath -m -- "$CFG_ROOTFS_IMAGE") || die "cannot resolve ROOTFS_IMAGE $CFG_ROOTFS_IMAGE"
    is_path "$IMAGE" || die "ROOTFS_IMAGE $(shown "$IMAGE") is not a path of plain characters"
    [[ $IMAGE != "$ROOT" && $IMAGE != "$ROOT"/* ]] ||
        die "ROOTFS_IMAGE $IMAGE must lie outside the rootfs $ROOT"
}

setup_rehearse() {
    local i src
    [[ -n $REHEARSE ]] || return 0
    absolute "$REHEARSE"
    HOSTDIR=$(realpath -m -- "$REPLY")
    if ! is_path "$HOSTDIR" || [[ $HOSTDIR == / ]]; then
        die "--rehearse $(shown "$REHEARSE") is not a directory path of plain characters (not /)"
    fi
    [[ $HOSTDIR != "$ROOT" && $HOSTDIR != "$ROOT"/* ]] ||
        die "--rehearse directory $HOSTDIR must lie outside the rootfs $ROOT"
    # the rehearsal's overlays keep their upper layers in HOSTDIR: overlayfs
    # options cannot carry ',' or ':', and an upper layer inside its lower one
    # is refused by the kernel
    [[ $HOSTDIR != *[,:]* ]] || die "--rehearse directory $HOSTDIR must not contain ',' or ':'"
    for i in "${!MT_TYPE[@]}"; do
        case ${MT_TYPE[i]} in
        bind) src=$(realpath -m -- "${MT_SOURCE[i]}") ;;
        devtmpfs) src=/dev ;;
        *) continue ;;
        esac
        [[ $HOSTDIR != "$src" && $HOSTDIR != "$src"/* ]] ||
            die "--rehearse directory $HOSTDIR must lie outside $src, which the rehearsal overlays"
    done
}

need_root() {
    [[ $DRY_RUN == 1 || $EUID -eq 0 ]] || die "must run as root (or with --dry-run)"
}

# --- the mount table as the kernel sees it ------------------------------------
MI_ID=() MI_PARENT=() MI_DEV=() MI_PATH=() MI_FSTYPE=() MI_SOURCE=() MI_SUPER=()
unescape_mi() {
    local s=$1
    s=${s//\\040/ }
    s=${s//\\011/$'\t'}
    s=${s//\\012/$'\n'}
    REPLY=${s//\\134/\\}
}
read_mountinfo() {
    MI_ID=() MI_PARENT=() MI_DEV=() MI_PATH=() MI_FSTYPE=() MI_SOURCE=() MI_SUPER=()
    local id parent dev _root mp rest fstype source super
    while read -r id parent dev _root mp rest; do
        rest=${rest#* - }
        fstype=${rest%% *} rest=${rest#* }
        source=${rest%% *} super=${rest#* }
        [[ $super != "$rest" ]] || super=""
        if [[ $mp == *\\* ]]; then unescape_mi "$mp"; mp=$REPLY; fi
        if [[ $source == *\\* ]]; then unescape_mi "$source"; source=$REPLY; fi
        MI_ID+=("$id") MI_PARENT+=("$parent") MI_DEV+=("$dev") MI_PATH+=("$mp")
        MI_FSTYPE+=("$fstype") MI_SOURCE+=("$source") MI_SUPER+=("$super")
    done </proc/self/mountinfo
}

# mounts_at PATH: REPLY = how many mounts sit exactly on PATH, TOP_FSTYPE = the last one's
# type, AT_IDX = their indices (into MI_*) in mount order
mounts_at() {
    local i n=0
    TOP_FSTYPE="" AT_IDX=()
    for i in "${!MI_PATH[@]}"; do
        if [[ ${MI_PATH[i]} == "$1" ]]; then
            n=$((n + 1))
            TOP_FSTYPE=${MI_FSTYPE[i]}
            AT_IDX+=("$i")
        fi
    done
    REPLY=$n
}

# climb_at PATH CUR: REPLY = the top of the stack of mounts on PATH that
# starts on mount CUR (an index into MI_*), or CUR when nothing is mounted there
climb_at() {
    local p=$1 cur=$2 i moved=1
    while ((moved)); do
        moved=0
        for i in "${!MI_PATH[@]}"; do
            if [[ ${MI_PATH[i]} == "$p" && ${MI_PARENT[i]} == "${MI_ID[cur]}" && $i != "$cur" ]]; then
                cur=$i moved=1
                break
            fi
        done
    done
    REPLY=$cur
}

# mount_of PATH: REPLY = the index (into MI_*) of the mount a canonical PATH
# lies on, walking from / the way a path lookup does (a mount hidden under a
# later mount on one of its parents is skipped).  Call read_mountinfo first.
mount_of() {
    local rest=${1#/} comp p="" cur=-1 i
    for i in "${!MI_PATH[@]}"; do
        if [[ ${MI_PATH[i]} == / ]]; then cur=$i; break; fi
    done
    ((cur >= 0)) || { REPLY=-1; return 0; }
    climb_at / "$cur"
    cur=$REPLY
    while [[ -n $rest ]]; do
        comp=${rest%%/*}
        if [[ $rest == */* ]]; then rest=${rest#*/}; else rest=""; fi
        [[ -n $comp ]] || continue
        p+=/$comp
        climb_at "$p" "$cur"
        cur=$REPLY
    done
    REPLY=$cur
}

# existing_parent PATH: REPLY = PATH or its deepest existing ancestor
existing_parent() {
    local p=$1
    while [[ ! -e $p && $p == /*/* ]]; do p=${p%/*}; done
    [[ -e $p ]] || p=/
    REPLY=$p
}

under_root() { [[ $1 == "$ROOT"/* ]]; }

# --- the rootfs image (ROOTFS_IMAGE), loop-mounted on ROOT ------------------------
# image_kind FILE: REPLY = ext4, squashfs, qcow2 or "" (by magic number)
image_kind() {
    local m
    REPLY=""
    m=$(od -An -tx1 -N4 -- "$1" 2>/dev/null | tr -d ' \n') || m=""
    case $m in
    68737173) REPLY=squashfs; return 0 ;;
    514649fb) REPLY=qcow2; return 0 ;;
    esac
    m=$(od -An -tx1 -j1080 -N2 -- "$1" 2>/dev/null | tr -d ' \n') || m=""
    [[ $m != 53ef ]] || REPLY=ext4
    return 0
}

# loop_backing DEV: REPLY = the file behind loop device DEV (/dev/loopN), or ""
loop_backing() {
    local n=${1#/dev/}
    REPLY=""
    [[ $n =~ ^loop[0-9]+$ && -r /sys/block/$n/loop/backing_file ]] || return 0
    read -r REPLY <"/sys/block/$n/loop/backing_file" || REPLY=""
    return 0
}

# image_loops FILE: IMAGE_LOOPS = the loop devices FILE is attached to
image_loops() {
    local f b
    IMAGE_LOOPS=()
    for f in /sys/block/loop*/loop/backing_file; do
        [[ -r $f ]] || continue
        read -r b <"$f" || continue
        [[ $b == "$1" ]] || continue
        f=${f#/sys/block/}
        IMAGE_LOOPS+=("/dev/${f%%/*}")
    done
}

# image_at_root FILE: is the top mount on ROOT a loop mount of FILE?  Call
# read_mountinfo first; sets ROOT_TOP_SRC / ROOT_TOP_FSTYPE ("" if ROOT is no mount point).
image_at_root() {
    local i
    ROOT_TOP_SRC="" ROOT_TOP_FSTYPE=""
    for i in "${!MI_PATH[@]}"; do
        [[ ${MI_PATH[i]} != "$ROOT" ]] || ROOT_TOP_SRC=${MI_SOURCE[i]} ROOT_TOP_FSTYPE=${MI_FSTYPE[i]}
    done
    [[ -n $ROOT_TOP_SRC && -n $1 ]] || return 1
    loop_backing "$ROOT_TOP_SRC"
    [[ -n $REPLY && $REPLY == "$1" ]]
}

# resolve_in_root ROOT PATH: REPLY = ROOT + PATH with every symlink followed as
# if ROOT were / (absolute links and '..' never leave ROOT).
resolve_in_root() {
    local root=$1 todo=${2#/} cur="" comp link hops=0
    while [[ -n $todo ]]; do
        comp=${todo%%/*}
        if [[ $todo == */* ]]; then todo=${todo#*/}; else todo=""; fi
        case $comp in
        "" | .) continue ;;
        ..) cur=${cur%/*}; continue ;;
        esac
        if [[ -L $root$cur/$comp ]]; then
            hops=$((hops + 1))
            ((hops <= 40)) || return 1
            link=$(readlink -- "$root$cur/$comp") || return 1
            [[ $link != /* ]] || cur=""
            todo=${link#/}${todo:+/$todo}
        else
            cur=$cur/$comp
        fi
    done
    REPLY=$root$cur
}

# --- state: what prepare did, per rootfs --------------------------------------------
# A real deployment keeps it in /run/rootfs-build/IMAGE/<id> (ROOTFS_BUILD_STATE_DIR
# overrides the base), a rehearsal in HOSTDIR/.rehearsal/<id>, so a rehearsal
# never touches a real deployment's state.  <id> is a hash of the canonical
# rootfs path (stored inside as root=), so two roots never share state.
state_init() {
    local base=${ROOTFS_BUILD_STATE_DIR:-/run/rootfs-build/$IMAGE_NAME} id
    is_path "$base" || die "ROOTFS_BUILD_STATE_DIR $(shown "$base") is not an absolute path of plain characters"
    id=$(printf '%s' "$ROOT" | sha256sum) || die "sha256sum failed"
    id=${id:0:32}
    REAL_STATE_DIR=$base/$id
    if [[ -n $REHEARSE ]]; then STATE_DIR=$HOSTDIR/.rehearsal/$id; else STATE_DIR=$REAL_STATE_DIR; fi
    STATE_MOUNTS=$STATE_DIR/mounts
    STATE_SKIPPED=$STATE_DIR/skipped
    STATE_INFO=$STATE_DIR/info
    STATE_MASKED=$STATE_DIR/masked
}

take_lock() {
    mkdir -p -- "$STATE_DIR"
    chmod 0700 -- "$STATE_DIR"
    exec 9>>"$STATE_DIR/lock"
    flock -w 60 9 || die "another prepare/teardown of $ROOT is running ($STATE_DIR/lock)"
}

# real_state_in_use: a real deployment of ROOT has recorded mounts
real_state_in_use() {
    local tag _path
    [[ -f $REAL_STATE_DIR/mounts ]] || return 1
    while IFS=$'\t' read -r tag _path; do
        [[ $tag =~ ^([0-9]+|image)$ ]] && return 0
    done <"$REAL_STATE_DIR/mounts"
    return 1
}

# read_state: REC_TAG/REC_PATH = every record in order (a table index or
# "image" for a mount, "dir"/"file" for what prepare created outside the
# rootfs's own filesystem); REC_IDX/REC_MPATH = the mount records; REC_BY_IDX
# only when the records belong to this very table; SKIPPED_BY_IDX = entries
# prepare skipped; CG_DECIDED[root index] = v1|v2, prepare's cgroup decision.
REC_TAG=() REC_PATH=() REC_IDX=() REC_MPATH=() REC_IMAGE=""
declare -A REC_BY_IDX=() SKIPPED_BY_IDX=() CG_DECIDED=() CG_MODE=()
STATE_TABLE="" STATE_MODE="" STATE_IMAGE="" STATE_ROOT=""
read_state() {
    local tag path key value
    REC_TAG=() REC_PATH=() REC_IDX=() REC_MPATH=() REC_BY_IDX=() SKIPPED_BY_IDX=() CG_DECIDED=()
    REC_IMAGE="" STATE_TABLE="" STATE_MODE="" STATE_IMAGE="" STATE_ROOT=""
    if [[ -f $STATE_INFO ]]; then
        while IFS='=' read -r key value; do
            case $key in
            table) STATE_TABLE=$value ;;
            mode) STATE_MODE=$value ;;
            root) STATE_ROOT=$value ;;
            image) if is_path "$value"; then STATE_IMAGE=$value; fi ;;
            cgroup.*) if [[ ${key#cgroup.} =~ ^[0-9]+$ && $value =~ ^v[12]$ ]]; then CG_DECIDED[${key#cgroup.}]=$value; fi ;;
            esac
        done <"$STATE_INFO"
    fi
    [[ -z $STATE_ROOT || $STATE_ROOT == "$ROOT" ]] ||
        die "state $STATE_DIR belongs to $STATE_ROOT, not $ROOT"
    [[ $STATE_TABLE == "$TABLE_ID" ]] || CG_DECIDED=()
    if [[ -f $STATE_MOUNTS ]]; then
        while IFS=$'\t' read -r tag path; do
            is_path "$path" || continue
            case $tag in
            image)
                [[ $path == "$ROOT" ]] || continue
                REC_IMAGE=$path ;;
            dir | file) ;;
            *)
                [[ $tag =~ ^[0-9]+$ ]] || continue
                REC_IDX+=("$tag") REC_MPATH+=("$path")
                [[ $STATE_TABLE != "$TABLE_ID" ]] || REC_BY_IDX[$tag]=$path ;;
            esac
            REC_TAG+=("$tag") REC_PATH+=("$path")
        done <"$STATE_MOUNTS"
    fi
    if [[ -f $STATE_SKIPPED && $STATE_TABLE == "$TABLE_ID" ]]; then
        while IFS=$'\t' read -r tag value; do
            if [[ $tag =~ ^[0-9]+$ ]]; then SKIPPED_BY_IDX[$tag]=$value; fi
        done <"$STATE_SKIPPED"
    fi
}

describe() {
    local i=$1 opts=""
    [[ -z ${MT_OPTIONS[i]} ]] || opts=" -o ${MT_OPTIONS[i]}"
    printf '%s%s %s on %s' "${MT_TYPE[i]}" "$opts" "${MT_SOURCE[i]}" "${MT_TARGET[i]}"
}

# --- does the mount there match the table? ------------------------------------------
# Where a rehearsal keeps what stands in for the machine's own directories:
# table entry I's overlay layers and file copies (HOSTDIR/.rehearsal/<id>/...)
rehearsal_upper() { REPLY=$STATE_DIR/upper/$1; }
rehearsal_work() { REPLY=$STATE_DIR/work/$1; }
rehearsal_copy() { REPLY=$STATE_DIR/files/$1; }

# dev_of "MAJOR:MINOR": REPLY = the st_dev number stat -c %d prints for it
dev_of() {
    local maj=${1%%:*} min=${1#*:}
    REPLY=$(((min & 0xff) | ((maj & 0xfff) << 8) | ((min & ~0xff) << 12) | ((maj & ~0xfff) << 32)))
}

# same_file J FILE: is mount J (an index into MI_*) a bind mount of FILE?  The
# root of a visible mount must be FILE itself (device and inode); a mount
# hidden under another one can only be compared by device.
same_file() {
    local j=$1 file=$2 want got
    want=$(stat -L -c '%d:%i' -- "$file" 2>/dev/null) || return 1
    mount_of "${MI_PATH[j]}"
    if [[ $REPLY == "$j" ]]; then
        got=$(stat -L -c '%d:%i' -- "${MI_PATH[j]}" 2>/dev/null) || return 1
        [[ $got == "$want" ]]
    else
        dev_of "${MI_DEV[j]}"
        [[ $REPLY == "${want%%:*}" ]]
    fi
}

# entry_expect I: WANT = what entry I must look like once mounted, in words
entry_expect() {
    local i=$1 type=${MT_TYPE[$1]} src=${MT_SOURCE[$1]}
    if [[ ${MT_ROLE[i]} == cgroup-root && ${CG_MODE[$i]:-${CG_DECIDED[$i]:-}} == v2 ]]; then
        WANT="cgroup2"
        return 0
    fi
    case $type in
    qtfs) if [[ -n $REHEARSE ]]; then WANT="a bind mount of $HOSTDIR$src"; else WANT="qtfs from $src"; fi ;;
    bind)
        if [[ -z $REHEARSE ]]; then WANT="a bind mount of $src"
        elif [[ -f $src ]]; then rehearsal_copy "$i"; WANT="a bind mount of $REPLY (a copy of $src)"
        else rehearsal_upper "$i"; WANT="an overlay of $src (upper layer $REPLY)"; fi ;;
    devtmpfs)
        if [[ -z $REHEARSE ]]; then WANT="devtmpfs"
        else rehearsal_upper "$i"; WANT="an overlay of /dev (upper layer $REPLY)"; fi ;;
    *) WANT="$type from $src" ;;
    esac
}

# entry_matches I J: is mount J (an index into MI_*) what table entry I mounts?
entry_matches() {
    local i=$1 j=$2 type=${MT_TYPE[$1]} src=${MT_SOURCE[$1]} c
    local ft=${MI_FSTYPE[$2]} ms=${MI_SOURCE[$2]} super=",${MI_SUPER[$2]},"
    if [[ ${MT_ROLE[i]} == cgroup-root ]]; then
        case ${CG_MODE[$i]:-${CG_DECIDED[$i]:-}} in
        v2) [[ $ft == cgroup2 ]]; return ;;
        v1) [[ $ft == tmpfs && $ms == "$src" ]]; return ;;
        *) [[ $ft == cgroup2 || ($ft == tmpfs && $ms == "$src") ]]; return ;;
        esac
    fi
    case $type in
    qtfs)
        if [[ -n $REHEARSE ]]; then same_file "$j" "$HOSTDIR$src"; return; fi
        [[ $ft == qtfs && $ms == "$src" ]] ;;
    bind)
        if [[ -z $REHEARSE ]]; then same_file "$j" "$src"; return; fi
        if [[ -f $src ]]; then rehearsal_copy "$i"; same_file "$j" "$REPLY"; return; fi
        rehearsal_upper "$i"
        [[ $ft == overlay && $super == *",upperdir=$REPLY,"* ]] ;;
    devtmpfs)
        if [[ -z $REHEARSE ]]; then [[ $ft == devtmpfs ]]; return; fi
        rehearsal_upper "$i"
        [[ $ft == overlay && $super == *",upperdir=$REPLY,"* ]] ;;
    cgroup)
        [[ $ft == cgroup && $ms == "$src" ]] || return 1
        cgroup_controllers "${MT_OPTIONS[i]}"
        for c in "${CONTROLLERS[@]}"; do [[ $super == *",$c,"* ]] || return 1; done ;;
    *) [[ $ft == "$type" && $ms == "$src" ]] ;;
    esac
}

# cgroup_controllers OPTIONS: CONTROLLERS = the controller names in a cgroup v1 option string
cgroup_controllers() {
    local o
    local -a words
    CONTROLLERS=()
    IFS=, read -r -a words <<<"$1"
    for o in "${words[@]}"; do
        case $o in
        *=* | "" | rw | ro | nosuid | suid | nodev | dev | noexec | exec | relatime | norelatime | \
            noatime | atime | strictatime | nodiratime | diratime | sync | async | dirsync | \
            lazytime | nolazytime | silent | loud | defaults | none | noprefix | clone_children | \
            xattr | all | cpuset_v2_mode | favordynmods) ;;
        *) CONTROLLERS+=("$o") ;;
        esac
    done
}

# entry_mounted I: 0 when table entry I is mounted, 1 when it is not, 2 when
# its target cannot be resolved, 3 when something else is mounted where it
# belongs (MISMATCH says what).  PATH_OF = where it is (or would be).
# DONE_PATHS holds the paths of the entries before I that are mounted, so
# stacked mounts on one path (sysfs, then qtfs on /sys) count separately:
# entry I must be the k-th mount on its path.
DONE_PATHS=() MISMATCH=""
entry_mounted() {
    local i=$1 p k=1 d j
    MISMATCH=""
    if [[ -n ${REC_BY_IDX[$i]:-} ]]; then
        p=${REC_BY_IDX[$i]}
    else
        resolve_in_root "$ROOT" "${MT_TARGET[i]}" || return 2
        p=$REPLY
    fi
    PATH_OF=$p
    for d in "${DONE_PATHS[@]}"; do [[ $d != "$p" ]] || k=$((k + 1)); done
    mounts_at "$p"
    ((REPLY >= k)) || return 1
    j=${AT_IDX[k - 1]}
    MOUNT_MI=$j
    entry_matches "$i" "$j" && return 0
    entry_expect "$i"
    MISMATCH="$p has ${MI_FSTYPE[j]} from ${MI_SOURCE[j]} mounted, but the table wants $WANT there"
    return 3
}

# --- processes ---------------------------------------------------------------------
pid_comm() {
    REPLY=""
    { read -r REPLY <"/proc/$1/comm"; } 2>/dev/null || REPLY=""
    return 0
}

# Processes whose root directory is the rootfs (chrooted into it).
rootfs_pids() {
    local d r
    ROOT_PIDS=()
    for d in /proc/[0-9]*; do
        r=$(readlink -- "$d/root" 2>/dev/null) || continue
        [[ $r == "$ROOT" || $r == "$ROOT"/* ]] && ROOT_PIDS+=("${d#/proc/}")
    done
    return 0
}

# rootfs_daemons: DAEMON_PIDS / DAEMON_NAMES = the libvirt daemons running from
# the rootfs, found by name or through their pid file <rootfs>/var/run/NAME.pid
# (a daemon may run under another name, like the demo's stand-ins);
# OTHER_PIDS = the other processes inside the rootfs, as pid(name).
rootfs_daemons() {
    local pid name p
    local -A inside=() seen=()
    DAEMON_PIDS=() DAEMON_NAMES=() OTHER_PIDS=()
    rootfs_pids
    for pid in "${ROOT_PIDS[@]}"; do
        inside[$pid]=1
        pid_comm "$pid"
        case $REPLY in
        libvirtd | virtlogd | virtlockd)
            DAEMON_PIDS+=("$pid") DAEMON_NAMES+=("$REPLY")
            seen[$pid]=1 ;;
        esac
    done
    for name in virtlogd libvirtd virtlockd; do
        resolve_in_root "$ROOT" "/var/run/$name.pid" || continue
        [[ -f $REPLY ]] || continue
        p=$(head -c 32 -- "$REPLY" 2>/dev/null | tr -dc '0-9') || p=""
        [[ -n $p && -n ${inside[$p]:-} && -z ${seen[$p]:-} ]] || continue
        DAEMON_PIDS+=("$p") DAEMON_NAMES+=("$name")
        seen[$p]=1
    done
    for pid in "${ROOT_PIDS[@]}"; do
        [[ -n ${seen[$pid]:-} ]] && continue
        pid_comm "$pid"
        if [[ -n $REPLY ]]; then OTHER_PIDS+=("$pid($REPLY)"); fi
    done
    return 0
}

# outside_daemons: OUTSIDE = libvirt daemons running on this machine but not
# from the rootfs (the DPU's own), as name[pid]
outside_daemons() {
    local d r
    OUTSIDE=()
    for d in /proc/[0-9]*; do
        pid_comm "${d#/proc/}"
        case $REPLY in libvirtd | virtlogd | virtlockd) ;; *) continue ;; esac
        r=$(readlink -- "$d/root" 2>/dev/null) || continue
        [[ $r == "$ROOT" || $r == "$ROOT"/* ]] || OUTSIDE+=("${REPLY}[${d#/proc/}]")
    done
    return 0
}
}
