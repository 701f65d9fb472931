#!/usr/bin/env bash
# Copy the chat page's third-party files into static/vendor/ from the npm registry, exactly as
# package.json and package-lock.json beside this script pin them: each package's published,
# minified file and its licence, used as they are (no build step, no CDN).
#
# Upgrade: change a version in package.json, run `npm install --package-lock-only` in this
# folder, then `bash static/vendor/update.sh`; run the page tests and commit the lot.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --silent)

from="$work/node_modules"
copy() { # copy FROM TO: FROM under node_modules, TO under static/vendor
  mkdir -p "$(dirname "$here/$2")"
  cp "$from/$1" "$here/$2"
  chmod 644 "$here/$2"
}
copy marked/lib/marked.esm.js marked/marked.esm.js
copy marked/LICENSE marked/LICENSE
copy dompurify/dist/purify.min.js dompurify/purify.min.js
copy dompurify/LICENSE dompurify/LICENSE
copy dompurify/LICENSE-MPL dompurify/LICENSE-MPL
copy @highlightjs/cdn-assets/es/highlight.min.js highlightjs/highlight.min.js
copy @highlightjs/cdn-assets/styles/a11y-light.min.css highlightjs/a11y-light.min.css
copy @highlightjs/cdn-assets/styles/a11y-dark.min.css highlightjs/a11y-dark.min.css
copy @highlightjs/cdn-assets/LICENSE highlightjs/LICENSE
