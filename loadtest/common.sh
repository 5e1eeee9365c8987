# Sourced by compare.sh, ab.sh and scaling.sh: build the release binaries, say which
# tree they come from, and find and wait for loopback ports.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"

# Always build (quick when up to date) so the binaries match the tree, and say which tree.
build_release() {
  (cd "$root" && cargo build --release -p merkle-kv -p loadtest >&2)
  local rev
  rev="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  [[ -z "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]] || rev="$rev (dirty tree)"
  echo "commit $rev"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Wait up to 10 s for something to listen on PORT; false if nothing does.
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
