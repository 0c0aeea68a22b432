#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the guards (scripts/lint.sh), then the test suite against the real
# Flywheel CLI, schedulers and DICOM servers. Extra arguments go to pytest, e.g.
#   scripts/test.sh tests/unit        the unit tests only (no server)
#   scripts/test.sh -m orthanc        one server's part (markers: fw slurm sge orthanc dcmqrscp qrscp lmod dcm2niix chromium)
#   scripts/test.sh -k config -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the guards first (ruff, mypy, import layering): a lint failure fails the run
scripts/lint.sh
TOOLS=${CLPIPE_TOOLS:-$HOME/.cache/clpipe-tests}
export CLPIPE_TEST_FW="$TOOLS/fw-18.5.1/bin/fw"
export CLPIPE_TEST_FW_OLD="$TOOLS/fw-17.5.1/bin/fw"
export CLPIPE_TEST_SDK_PYTHON="$TOOLS/sdk/bin/python"

# Real SLURM and Grid Engine on loopback for the batch tests (root with apt only; elsewhere
# those tests fail, saying how to start them), and real DICOM servers (Orthanc with DICOMweb, dcmqrscp,
# qrscp) holding the synthetic data set for the DICOMweb/DIMSE tests (those fail without them).
# What is started here is stopped again when the tests end (DICOM servers that were already
# running before, as others may be using them, are left running).
downs=()
# shellcheck disable=SC2317 # run by the EXIT trap
stop_servers() { local down; for down in "${downs[@]}"; do "$down" >/dev/null 2>&1 || true; done; }
trap stop_servers EXIT
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${CLPIPE_SCHEDULERS:-1}" = 1 ]; then
  downs+=(scripts/infra/schedulers-down.sh)
  eval "$(scripts/infra/schedulers-up.sh)"
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${CLPIPE_DICOM_SERVERS:-1}" = 1 ]; then
  [ -s "${CLPIPE_INFRA:-/tmp/clpipe-infra}/dicom/env.sh" ] || downs+=(scripts/infra/dicom-down.sh)
  eval "$(scripts/infra/dicom-up.sh)"
fi
set +e
.venv/bin/python -m pytest -ra "$@"
code=$?
set -e
if [ "$code" = 5 ]; then echo "pytest collected no tests: treating as a failure" >&2; exit 1; fi
exit "$code"
