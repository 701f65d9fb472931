// @microsoft/fetch-event-source on one request until `[DONE]`, retrying on errors.
// Usage: node fetch_event_source.mjs '{"url", "method", "headers", "body", "retryMs", "maxErrors", "timeoutMs"}'
// Prints {type: open, status, session}, {type: message, id, event, data},
// {type: error, message} for each error (then it retries after retryMs), {type: close}
// if the server ends the response, and {type: end}.
import { fetchEventSource } from '@microsoft/fetch-event-source';
import { deadline, emit, installBrowserShims } from './common.mjs';

installBrowserShims();
const options = JSON.parse(process.argv[2]);
const timer = deadline(options.timeoutMs ?? 20000);
const controller = new AbortController();
let errors = 0;

await fetchEventSource(options.url, {
  method: options.method ?? 'GET',
  headers: options.headers ?? {},
  body: options.body,
  signal: controller.signal,
  openWhenHidden: true,
  async onopen(response) {
    emit({ type: 'open', status: response.status, session: response.headers.get('x-relay-session') });
    const type = response.headers.get('content-type') ?? '';
    if (response.status !== 200 || !type.startsWith('text/event-stream')) {
      throw new Error(`status ${response.status}, ${type}`);
    }
  },
  onmessage(message) {
    emit({ type: 'message', id: message.id, event: message.event, data: message.data });
    if (message.data === '[DONE]') controller.abort();
  },
  onclose() {
    emit({ type: 'close' });
  },
  onerror(error) {
    emit({ type: 'error', message: String(error) });
    if (++errors > (options.maxErrors ?? 3)) throw error;
    return options.retryMs ?? 50;
  },
});
clearTimeout(timer);
emit({ type: 'end' });
