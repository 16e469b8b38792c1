//! The admin pages: `/ui` (the console), `/docs` (Swagger UI) and `/redoc` (ReDoc). Their own
//! HTML, script and style are compiled in from `src/admin/ui/`; the packages they build on
//! are read from disk by [`super::assets`].
//!
//! Every page is sent with a Content-Security-Policy that allows nothing but this listener,
//! so a page cannot load anything from another host even by mistake.

use std::path::Path;

use http::{header, StatusCode};

use super::assets;
use super::reply::Reply;

const CONSOLE_HTML: &str = include_str!("ui/console.html");
const CONSOLE_JS: &str = include_str!("ui/console.js");
const CONSOLE_CSS: &str = include_str!("ui/console.css");
const SWAGGER_INIT_JS: &str = include_str!("ui/swagger-init.js");

/// Scripts and styles from this listener only. Swagger UI and ReDoc set inline styles, and
/// ReDoc runs its search in a worker made from a blob.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn html(status: StatusCode, body: String) -> Reply {
    Reply::new(status, "text/html; charset=utf-8", body)
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::CACHE_CONTROL, "no-cache")
}

/// A page that explains which package is missing and how to install it (503: the page exists
/// but cannot work yet).
fn missing(title: &str, package: &str) -> Reply {
    html(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title><link rel=\"icon\" href=\"data:,\"></head>\
             <body><h1>{title}</h1><p>This page needs the npm package <code>{package}</code>, which is not installed.</p>\
             <p>Install the admin pages' packages with <code>{hint}</code>, then reload this page (no restart needed).</p>\
             <p>The API description itself is at <a href=\"/openapi.json\">/openapi.json</a>.</p></body></html>",
            hint = assets::INSTALL_HINT
        ),
    )
}

/// The admin pages and their files; `None` for any other path.
pub async fn page(path: &str, assets_dir: Option<&Path>) -> Option<Reply> {
    let script = |body: &'static str| {
        Reply::new(StatusCode::OK, "text/javascript; charset=utf-8", body)
            .header(header::CACHE_CONTROL, "no-cache")
    };
    Some(match path {
        "/ui" | "/ui/" => {
            let charts = assets::installed("uplot", assets_dir);
            let (head, notice) = if charts {
                (
                    "<link rel=\"stylesheet\" href=\"/assets/uplot/uPlot.min.css\">\n<script src=\"/assets/uplot/uPlot.iife.min.js\"></script>",
                    String::new(),
                )
            } else {
                (
                    "",
                    format!(
                        "<p class=\"notice\" id=\"charts-missing\">Charts need the npm package <code>uplot</code>: {}.</p>",
                        assets::INSTALL_HINT
                    ),
                )
            };
            html(
                StatusCode::OK,
                CONSOLE_HTML
                    .replace("<!--CHART-ASSETS-->", head)
                    .replace("<!--CHART-NOTICE-->", &notice),
            )
        }
        "/ui/console.js" => script(CONSOLE_JS),
        "/ui/console.css" => Reply::new(StatusCode::OK, "text/css; charset=utf-8", CONSOLE_CSS)
            .header(header::CACHE_CONTROL, "no-cache"),
        "/docs" | "/docs/" => {
            if !assets::installed("swagger-ui-dist", assets_dir) {
                return Some(missing("Lumen API — Swagger UI", "swagger-ui-dist"));
            }
            html(
                StatusCode::OK,
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Lumen API — Swagger UI</title><link rel=\"icon\" href=\"data:,\">\
                 <link rel=\"stylesheet\" href=\"/assets/swagger-ui/swagger-ui.css\"></head>\
                 <body><div id=\"swagger-ui\"></div>\
                 <script src=\"/assets/swagger-ui/swagger-ui-bundle.js\"></script>\
                 <script src=\"/docs/init.js\"></script></body></html>"
                    .to_string(),
            )
        }
        "/docs/init.js" => script(SWAGGER_INIT_JS),
        "/redoc" | "/redoc/" => {
            if !assets::installed("redoc", assets_dir) {
                return Some(missing("Lumen API — ReDoc", "redoc"));
            }
            // The <redoc> element starts itself once the bundle has loaded.
            html(
                StatusCode::OK,
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Lumen API — ReDoc</title><link rel=\"icon\" href=\"data:,\"></head>\
                 <body><redoc spec-url=\"/openapi.json\" hide-download-button=\"false\" disable-search=\"false\"></redoc>\
                 <script src=\"/assets/redoc/redoc.standalone.js\"></script></body></html>"
                    .to_string(),
            )
        }
        _ => {
            let url = path.strip_prefix("/assets/")?;
            return Some(match assets::read(url, assets_dir).await {
                Some((content_type, bytes)) => Reply::new(StatusCode::OK, content_type, bytes)
                    .header(header::CACHE_CONTROL, "max-age=3600"),
                None => Reply::error(
                    StatusCode::NOT_FOUND,
                    &format!("asset not found or not installed: {}", assets::INSTALL_HINT),
                    "invalid_request_error",
                    "unknown_url",
                ),
            });
        }
    })
}
