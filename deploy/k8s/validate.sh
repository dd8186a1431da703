#!/usr/bin/env bash
# Validates deploy/k8s offline: every resource file listed in kustomization.yaml must exist and pass
# kubernetes-validate --strict against Kubernetes $K8S_VERSION, and every *.yaml here must be listed.
# Needs kubernetes-validate (scripts/requirements.txt) in .venv, or KUBERNETES_VALIDATE=/path/to/it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
K8S_VERSION="${K8S_VERSION:-1.37.0}" # the newest version kubernetes-validate 1.37.0 has schemas for
KV="${KUBERNETES_VALIDATE:-$REPO_ROOT/.venv/bin/kubernetes-validate}"
KUSTOMIZATION="$HERE/kustomization.yaml"

fail() { echo "validate.sh: FAIL: $*" >&2; exit 1; }

[ -x "$KV" ] || fail "kubernetes-validate not found at $KV: run
  $REPO_ROOT/.venv/bin/pip install -r $REPO_ROOT/scripts/requirements.txt
or set KUBERNETES_VALIDATE to its path"
[ -f "$KUSTOMIZATION" ] || fail "$KUSTOMIZATION is missing"

# The entries of the top-level `resources:` list (block style, one per line).
mapfile -t listed < <(awk '
  /^resources:[[:space:]]*(#.*)?$/ { in_list = 1; next }
  in_list && /^[^[:space:]#-]/ { in_list = 0 }
  in_list && /^[[:space:]]*-[[:space:]]/ {
    sub(/^[[:space:]]*-[[:space:]]+/, ""); sub(/[[:space:]]+#.*$/, ""); gsub(/["'\'']/, ""); print
  }' "$KUSTOMIZATION")
[ ${#listed[@]} -gt 0 ] || fail "kustomization.yaml lists no resources"

problems=()
files=()
declare -A seen=()
for r in "${listed[@]}"; do
  case "$r" in
    */* | *[!A-Za-z0-9._-]*) problems+=("resource '$r' is not a plain file name in deploy/k8s"); continue ;;
    *.yaml | *.yml) ;;
    *) problems+=("resource '$r' is not a .yaml file"); continue ;;
  esac
  [ -z "${seen[$r]:-}" ] || { problems+=("resource '$r' is listed twice"); continue; }
  seen[$r]=1
  if [ -f "$HERE/$r" ]; then files+=("$HERE/$r"); else problems+=("listed resource '$r' does not exist"); fi
done
shopt -s nullglob
for f in "$HERE"/*.yaml "$HERE"/*.yml; do
  name="$(basename "$f")"
  [ "$name" = kustomization.yaml ] && continue
  [ -n "${seen[$name]:-}" ] || problems+=("$name is not listed in kustomization.yaml resources")
done

# kubernetes-validate exits 0 when it has no schema for a kind (a WARN line): count that as a failure.
set +e
out="$("$KV" --strict --kubernetes-version "$K8S_VERSION" "${files[@]}" 2>&1)"
rc=$?
set -e
resources="$(grep -c '^INFO .* passed for resource ' <<<"$out" || true)"
if [ "$rc" -ne 0 ] || grep -qv '^INFO ' <<<"$out"; then
  grep -v '^INFO ' <<<"$out" | awk '!seen[$0]++' >&2 || true
  problems+=("kubernetes-validate --strict found problems (exit $rc)")
fi

if [ ${#problems[@]} -gt 0 ]; then
  printf 'validate.sh: %s\n' "${problems[@]}" >&2
  fail "${#problems[@]} problem(s) in deploy/k8s"
fi
echo "validate.sh: OK: ${#files[@]} files ($resources resources) in deploy/k8s/kustomization.yaml pass kubernetes-validate $("$KV" --version) --strict against Kubernetes $K8S_VERSION; every manifest is listed"
