#!/usr/bin/env bash
# The package build's identity: a hash of the sources a `pip install` of TREE (default: the current
# directory) compiles, with the CUDA switch and arch list. dev/gpu_session.sh and dev/integ_session.sh
# store it in /tmp/orchard_site/.built and rebuild when it differs (a warm device machine keeps the site).
cd "${1:-.}" || exit 1
{ find src include python CMakeLists.txt pyproject.toml cmake -type f 2>/dev/null | sort | xargs cat
  echo "${ORCHARD_CUDA:-ON} ${GPU_ARCHS:-90}"; } | md5sum | cut -c1-32
