//! The front-end packages of the admin pages (Swagger UI, ReDoc, uPlot), read from disk.
//!
//! They come from the npm registry (`src/admin/ui/package.json`, installed by
//! `scripts/setup.sh`) and are neither committed nor compiled in: the binary builds and runs
//! without them, and the pages that need them then say how to install them. Only the files
//! listed in [`FILES`] are ever served, so no request path reaches the file system.

use std::path::{Path, PathBuf};

/// A file the pages load: its URL under `/assets/` and its place under `node_modules`.
pub struct File {
    pub url: &'static str,
    pub package: &'static str,
    pub path: &'static str,
    pub content_type: &'static str,
    /// Bytes replaced while serving: URLs of other hosts that a package hard-codes.
    pub rewrite: Option<(&'static str, &'static str)>,
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

pub const FILES: &[File] = &[
    File {
        url: "swagger-ui/swagger-ui-bundle.js",
        package: "swagger-ui-dist",
        path: "swagger-ui-dist/swagger-ui-bundle.js",
        content_type: JS,
        rewrite: None,
    },
    File {
        url: "swagger-ui/swagger-ui.css",
        package: "swagger-ui-dist",
        path: "swagger-ui-dist/swagger-ui.css",
        content_type: CSS,
        rewrite: None,
    },
    File {
        url: "redoc/redoc.standalone.js",
        package: "redoc",
        path: "redoc/bundles/redoc.standalone.js",
        content_type: JS,
        // ReDoc's "API docs by Redocly" link shows a logo fetched from Redocly's CDN, with no
        // option to turn it off: an edge host is often offline, and its pages never load
        // anything from another host. An empty inline image takes its place.
        rewrite: Some((
            "https://cdn.redoc.ly/redoc/logo-mini.svg",
            "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E",
        )),
    },
    File {
        url: "uplot/uPlot.iife.min.js",
        package: "uplot",
        path: "uplot/dist/uPlot.iife.min.js",
        content_type: JS,
        rewrite: None,
    },
    File {
        url: "uplot/uPlot.min.css",
        package: "uplot",
        path: "uplot/dist/uPlot.min.css",
        content_type: CSS,
        rewrite: None,
    },
];

/// How to install the packages, for the pages that miss them.
pub const INSTALL_HINT: &str = "npm ci --ignore-scripts --prefix src/admin/ui (scripts/setup.sh runs it), or point `admin_assets:` in the config at a node_modules folder holding swagger-ui-dist, redoc and uplot";

/// The `node_modules` folders searched, in order: the configured one alone, else the build
/// tree's (for a binary at `<tree>/target/<profile>/lumen`) and the packaged one.
fn roots(configured: Option<&Path>, exe: Option<&Path>) -> Vec<PathBuf> {
    if let Some(dir) = configured {
        return vec![dir.to_path_buf()];
    }
    let mut roots = Vec::with_capacity(2);
    // Only a real build tree (with its Cargo.toml): an installed `/usr/bin/lumen` must not pick
    // up whatever lies at `/src/admin/ui`.
    if let Some(tree) = exe
        .and_then(|exe| exe.parent()?.parent()?.parent())
        .filter(|tree| tree.join("Cargo.toml").is_file())
    {
        roots.push(tree.join("src/admin/ui/node_modules"));
    }
    roots.push(PathBuf::from("/usr/share/lumen/node_modules"));
    roots
}

/// Where `package` is installed, if anywhere.
pub fn locate(package: &str, configured: Option<&Path>) -> Option<PathBuf> {
    roots(configured, std::env::current_exe().ok().as_deref())
        .into_iter()
        .find(|root| root.join(package).join("package.json").is_file())
}

/// Whether every file of `package` is there.
pub fn installed(package: &str, configured: Option<&Path>) -> bool {
    locate(package, configured).is_some_and(|root| {
        FILES
            .iter()
            .filter(|f| f.package == package)
            .all(|f| root.join(f.path).is_file())
    })
}

/// `/assets/<url>`: the file's bytes and type, or `None` (unknown, or not installed).
pub async fn read(url: &str, configured: Option<&Path>) -> Option<(&'static str, Vec<u8>)> {
    let file = FILES.iter().find(|f| f.url == url)?;
    let root = locate(file.package, configured)?;
    let bytes = tokio::fs::read(root.join(file.path)).await.ok()?;
    let bytes = match file.rewrite {
        Some((from, to)) => replace(&bytes, from.as_bytes(), to.as_bytes()),
        None => bytes,
    };
    Some((file.content_type, bytes))
}

/// `haystack` with every `from` replaced by `to`.
fn replace(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_tree_is_searched_only_when_it_is_one() {
        let tree = std::env::temp_dir().join(format!("lumen-assets-{}", std::process::id()));
        let exe = tree.join("target/release/lumen");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        let packaged = PathBuf::from("/usr/share/lumen/node_modules");
        assert_eq!(roots(None, Some(&exe)), vec![packaged.clone()]);
        std::fs::write(tree.join("Cargo.toml"), "").unwrap();
        assert_eq!(
            roots(None, Some(&exe)),
            vec![tree.join("src/admin/ui/node_modules"), packaged]
        );
        let configured = Path::new("/opt/ui");
        assert_eq!(roots(Some(configured), Some(&exe)), vec![configured]);
        std::fs::remove_dir_all(&tree).unwrap();
    }

    #[test]
    fn replaces_every_occurrence() {
        let out = super::replace(
            b"a https://x/l.svg b https://x/l.svg",
            b"https://x/l.svg",
            b"data:,",
        );
        assert_eq!(out, b"a data:, b data:,");
        assert_eq!(super::replace(b"none", b"https://x", b"y"), b"none");
    }
}
