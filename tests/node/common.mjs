// Helpers for the client scripts: one JSON line per thing a library delivered, and
// the browser globals fetch-event-source expects under Node.

export function emit(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

// fetch-event-source calls window.setTimeout/clearTimeout/fetch and, even with
// openWhenHidden, document.removeEventListener when it is done.
export function installBrowserShims() {
  globalThis.window = {
    setTimeout: (fn, ms) => setTimeout(fn, ms),
    clearTimeout: (id) => clearTimeout(id),
    fetch: (...args) => fetch(...args),
  };
  globalThis.document = {
    hidden: false,
    addEventListener() {},
    removeEventListener() {},
  };
}

// A bound on the whole run: a client that never finishes fails the test, not the suite.
export function deadline(ms) {
  return setTimeout(() => {
    emit({ type: 'timeout', ms });
    process.exit(2);
  }, ms);
}
