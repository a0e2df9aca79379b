//! Dev mode's demo page: `GET /demo` (a self-contained page, embedded in the binary) and
//! `GET /demo/customws.js` (the TypeScript SDK's bundle, read from
//! `clients/typescript/dist/customws.min.js` at request time, so the binary never embeds a
//! generated file). Routed only with `--dev`; the file read is a small blocking read on the
//! shard thread, acceptable in development and never done in production.

use std::path::PathBuf;

/// The page, with `__WS_PATH__` standing for the configured WebSocket path.
const HTML: &str = include_str!("demo.html");

/// Where `npm run build` in `clients/typescript` writes the minified bundle.
pub const BUNDLE: &str = "clients/typescript/dist/customws.min.js";

/// A complete plain response.
#[derive(Debug)]
pub struct Page {
    /// HTTP status.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

/// The demo page or the SDK bundle for `path`; `None` for any other path.
pub fn route(path: &str, ws_path: &str) -> Option<Page> {
    match path {
        "/demo" | "/demo/" => Some(page(ws_path)),
        "/demo/customws.js" => Some(bundle()),
        _ => None,
    }
}

/// The built bundle: relative to the working directory first, then to the source tree this
/// binary was built from.
pub fn bundle_path() -> Option<PathBuf> {
    let candidates = [PathBuf::from(BUNDLE), PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(BUNDLE)];
    candidates.into_iter().find(|p| p.is_file())
}

fn page(ws_path: &str) -> Page {
    // A JSON string is a JS string literal; `<` escaped so that it cannot end the script.
    let literal = serde_json::to_string(ws_path).unwrap_or_else(|_| "\"/ws\"".into()).replace('<', "\\u003c");
    let body = HTML.replace("__WS_PATH__", &literal).into_bytes();
    Page { status: 200, content_type: "text/html; charset=utf-8", body }
}

fn bundle() -> Page {
    match bundle_path().map(std::fs::read) {
        Some(Ok(body)) => Page { status: 200, content_type: "text/javascript; charset=utf-8", body },
        _ => Page {
            status: 503,
            content_type: "text/plain; charset=utf-8",
            body: format!("{BUNDLE} is not built: run `npm ci && npm run build` in clients/typescript\n")
                .into_bytes(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_carries_the_ws_path_as_a_script_string() {
        let page = route("/demo", "/sock</script>").expect("page");
        let text = String::from_utf8(page.body).unwrap();
        assert_eq!(page.status, 200);
        assert!(text.contains(r#""/sock\u003c/script>""#), "{text}");
        assert!(!text.contains("__WS_PATH__"));
    }

    #[test]
    fn bundle_is_served_or_explained() {
        let page = route("/demo/customws.js", "/ws").expect("bundle");
        match bundle_path() {
            Some(_) => assert_eq!((page.status, page.content_type), (200, "text/javascript; charset=utf-8")),
            None => {
                assert_eq!(page.status, 503);
                assert!(String::from_utf8(page.body).unwrap().contains("npm run build"));
            }
        }
    }

    #[test]
    fn other_paths_are_not_demo_pages() {
        assert!(route("/demo/other", "/ws").is_none());
        assert!(route("/demox", "/ws").is_none());
    }
}
