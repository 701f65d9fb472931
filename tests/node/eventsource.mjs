// Node's `eventsource` package on one stream URL until `[DONE]`.
// Usage: node eventsource.mjs URL [TIMEOUT_MS]
// Prints {type: open}, {type: message, id, data} (id: the event's lastEventId),
// {type: error, ...} for each reconnect or server `event: error`, then {type: end}.
import { EventSource } from 'eventsource';
import { deadline, emit } from './common.mjs';

const [url, timeoutMs = '20000'] = process.argv.slice(2);
// Also what keeps Node running through a reconnect delay: the library unrefs its timer.
const timer = deadline(Number(timeoutMs));
const source = new EventSource(url);

function end() {
  source.close();
  clearTimeout(timer);
  emit({ type: 'end' });
}

source.addEventListener('open', () => emit({ type: 'open' }));
source.addEventListener('message', (e) => {
  emit({ type: 'message', id: e.lastEventId, data: e.data });
  if (e.data === '[DONE]') end();
});
source.addEventListener('error', (e) => {
  // A MessageEvent for the server's `event: error`; the library's ErrorEvent otherwise.
  emit({ type: 'error', data: e.data ?? null, message: e.message ?? null, code: e.code ?? null });
  if (e.data !== undefined || source.readyState === source.CLOSED) end();
});
