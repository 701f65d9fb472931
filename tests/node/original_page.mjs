// The original Vue page's reading logic (issue 13, point 5), run by fetch-event-source.
// Usage: node original_page.mjs URL QUESTION_JSON
// Prints {type: error, message} for an error (the page stops there) and then
// {type: result, text, node, done}: the text the page showed, the business node it
// kept, and whether it saw [DONE].
import { fetchEventSource } from '@microsoft/fetch-event-source';
import { deadline, emit, installBrowserShims } from './common.mjs';

installBrowserShims();
const [url, body] = process.argv.slice(2);
const timer = deadline(20000);
const controller = new AbortController();
let text = '';
let node = null;
let done = false;

await fetchEventSource(url, {
  method: 'POST',
  headers: { 'Content-Type': 'application/json' },
  body,
  signal: controller.signal,
  openWhenHidden: true,
  onmessage(msg) {
    if (!msg.data) return; // empty data is skipped
    if (msg.data === '[DONE]') {
      done = true;
      controller.abort();
      return;
    }
    const chunk = JSON.parse(msg.data);
    const choice = chunk.choices[0];
    if (choice.finish_reason === 'stop') {
      node = choice.delta; // the business node, not shown
      return;
    }
    if (choice.delta.role !== undefined) return; // the role announcement: content not shown
    if (choice.delta.content != null) text += choice.delta.content;
  },
  onerror(error) {
    emit({ type: 'error', message: String(error) });
    throw error; // no retry: the page shows the error
  },
}).catch(() => {});
clearTimeout(timer);
emit({ type: 'result', text, node, done });
