// Model output as Markdown, rendered safely (issue 15).
//
// marked parses it; raw HTML in it is escaped, so it shows as the text the model wrote and
// never becomes markup (as ChatGPT does); links go to http(s) and mailto only, and open in a
// new tab with no opener and no referrer; images from other origins are not loaded but shown
// as links, so an answer cannot send anything to a third party; highlight.js colours code.
// DOMPurify then sanitises the result anyway, with an allow-list of exactly what this
// renderer writes, before any of it reaches the document. The page's CSP is a third layer.
// The vendored files are used as published (static/vendor/update.sh).

import { Marked, Renderer } from "./vendor/marked/marked.esm.js";
import hljs from "./vendor/highlightjs/highlight.min.js";
// DOMPurify's minified build is UMD: imported for its effect, it sets globalThis.DOMPurify.
import "./vendor/dompurify/purify.min.js";

const purify = globalThis.DOMPurify;

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Every special character escaped: code, and raw HTML shown as written. */
function escapeAll(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** Text of a paragraph: escaped, but Markdown's character references (&copy;) still work. */
function escapeText(text) {
  return text.replace(/[<>"']|&(?!(?:#\d{1,7}|#[Xx][0-9a-fA-F]{1,6}|\w+);)/g, (c) => ESCAPES[c]);
}

/** The absolute URL of a link the page may follow: http(s) or mailto; else null. */
function safeUrl(href) {
  try {
    const url = new URL(href, location.href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

function sameOrigin(url) {
  return new URL(url, location.href).origin === location.origin;
}

function highlight(code, language) {
  return hljs.getLanguage(language)
    ? hljs.highlight(code, { language, ignoreIllegals: true }).value
    : escapeAll(code);
}

const base = new Renderer();

const renderer = {
  html({ text, block }) {
    const shown = escapeAll(block ? text.trim() : text);
    return block ? `<p>${shown}</p>\n` : shown;
  },
  text(token) {
    return token.tokens ? this.parser.parseInline(token.tokens) : escapeText(token.text);
  },
  codespan({ text }) {
    return `<code>${escapeAll(text)}</code>`;
  },
  code({ text, lang }) {
    // Only the first word of the info string names the language (```python title="x").
    const language = (lang || "").match(/^[\w#+.-]*/)[0].toLowerCase();
    const label = language || "text";
    return (
      `<div class="code-block"><div class="code-head"><span class="code-lang">${label}</span>` +
      `<button type="button" class="code-copy" aria-label="Copy ${label} code">Copy</button>` +
      `</div><pre tabindex="0"><code class="hljs">${highlight(text, language)}</code></pre></div>\n`
    );
  },
  link({ href, title, tokens }) {
    const inner = this.parser.parseInline(tokens);
    const url = safeUrl(href);
    if (!url) return inner; // javascript:, data:, ...: the link's text alone
    const tip = title ? ` title="${escapeAll(title)}"` : "";
    return `<a href="${escapeAll(url)}"${tip}>${inner}</a>`;
  },
  image({ href, title, text }) {
    const url = safeUrl(href);
    const alt = escapeAll(text);
    if (!url || url.startsWith("mailto:")) return alt;
    if (!sameOrigin(url)) return `<a href="${escapeAll(url)}">${alt || escapeAll(url)}</a>`;
    const tip = title ? ` title="${escapeAll(title)}"` : "";
    return `<img src="${escapeAll(url)}" alt="${alt}"${tip}>`;
  },
  checkbox({ checked }) {
    // A task list's box as a character: a disabled input would be an unlabelled form field.
    return checked ? "☑ " : "☐ ";
  },
  table(token) {
    // A wide table scrolls on its own, not the page; focusable, so keys can scroll it.
    return `<div class="table-wrap" tabindex="0">${base.table.call(this, token)}</div>\n`;
  },
};

// breaks: a single newline is a line break, as the model wrote it (GitHub's comments and
// most chat pages do the same; strict Markdown would join the lines).
const marked = new Marked({ gfm: true, breaks: true, renderer });

const SANITIZE = {
  ALLOWED_TAGS: [
    "a", "blockquote", "br", "button", "code", "del", "div", "em", "h1", "h2", "h3", "h4",
    "h5", "h6", "hr", "img", "li", "ol", "p", "pre", "span", "strong", "table", "tbody",
    "td", "th", "thead", "tr", "ul",
  ],
  ALLOWED_ATTR: [
    "align", "alt", "aria-label", "class", "href", "src", "start", "tabindex", "title", "type",
  ],
  // DOMPurify's default less every scheme but these (it tests every attribute's value that
  // is not a URL too: "0", "button" pass as values with no scheme).
  ALLOWED_URI_REGEXP: /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i,
  RETURN_DOM_FRAGMENT: true,
};

purify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  } else if (node.tagName === "IMG" && !sameOrigin(node.getAttribute("src") || "data:,")) {
    node.removeAttribute("src"); // the renderer makes links of these: never loaded
  }
});

/** DOMPurify with the renderer's allow-list: a DocumentFragment (a test tries it alone). */
export function sanitize(html) {
  return purify.sanitize(html, SANITIZE);
}

/**
 * Markdown rendered into `root`, again and again as the source grows while it streams.
 *
 * The whole source is parsed each time (Markdown is not local: a line can turn the
 * paragraph above it into a heading), but only the top-level blocks that changed are
 * rendered and sanitised: those whose source, and every one before them, are the same as
 * the last time keep their elements. So a frame costs the parse and the last block or two,
 * not the whole answer (docs/benchmarks.md, "The chat page").
 */
export class MarkdownView {
  constructor(root) {
    this.root = root;
    this.blocks = []; // { raw, nodes } per top-level token, as rendered last
    this.links = "{}"; // reference-style link definitions, which any block may use
  }

  render(source) {
    const tokens = marked.lexer(source);
    const links = JSON.stringify(tokens.links);
    let kept = 0;
    if (links === this.links) {
      while (kept < this.blocks.length && this.blocks[kept].raw === tokens[kept]?.raw) kept++;
    }
    this.links = links;
    for (const block of this.blocks.splice(kept)) for (const node of block.nodes) node.remove();
    for (const token of tokens.slice(kept)) {
      const one = [token];
      one.links = tokens.links;
      const fragment = sanitize(marked.parser(one));
      this.blocks.push({ raw: token.raw, nodes: [...fragment.childNodes] });
      this.root.append(fragment);
    }
  }
}
