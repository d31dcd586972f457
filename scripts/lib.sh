# scripts/lib.sh: shared settings and helpers for the project's scripts (sourced, not run).

# Everything built or downloaded lives outside the repo, here.
CACHE=${BLKTAP_CACHE:-$HOME/.cache/blktap2-rs}
# The pinned Debian kernel source package version.
KVER_DEB=7.3.4-1~bpo13+1
KSRC="$CACHE/linux-source-${KVER_DEB//[~+]/_}"
export PATH="$HOME/.cargo/bin:$PATH"

_t0=${_t0:-$(date +%s)}
stage() { printf '[%4ss] == %s\n' "$(( $(date +%s) - _t0 ))" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
