#!/usr/bin/env bash
# The service never reads server paths from a spec: upload the files, then point the spec at
# their ids. Usage: examples/submit_with_uploads.sh examples/tabular.json   (or torchscript_teacher.json)
# Needs DISTILLERY_URL and DISTILLERY_API_KEY (or a local `distillery serve`).
set -euo pipefail
spec=$1
ds_path=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["dataset"]; print(d.get("path", ""))' "$spec")
tm_path=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["teacher"]; print(t.get("path", ""))' "$spec")
ds_id=""; tm_id=""
[[ -n $ds_path ]] && ds_id=$(distillery datasets upload "$ds_path" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
[[ -n $tm_path ]] && tm_id=$(distillery models upload "$tm_path" --input-shape 1,8,8 --num-classes 10 --json \
                               | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
python3 - "$spec" "$ds_id" "$tm_id" > /tmp/distillery-spec.json <<'PY'
import json, sys
spec, ds_id, tm_id = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
if ds_id:
    keep = {k: v for k, v in spec["dataset"].items() if k in ("test_fraction", "max_samples")}
    spec["dataset"] = {"source": "upload", "id": ds_id, **keep}
if tm_id:
    spec["teacher"] = {"source": "upload", "id": tm_id}
print(json.dumps(spec))
PY
distillery submit /tmp/distillery-spec.json --wait --gate 'final.accuracy_drop<=0.05'
