//! Embeds every `migrations/NNNN_name.sql` file into the binary, in version order, so
//! that adding a migration is adding a file.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("migrations/ exists beside daemon/")
        .map(|e| e.expect("readable migrations/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut out = String::from(
        "/// Embedded migrations: (version, name, sql).\npub const MIGRATIONS: &[(i32, &str, &str)] = &[\n",
    );
    let mut seen = std::collections::BTreeSet::new();
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path.file_stem().unwrap().to_str().expect("UTF-8 file name");
        let (version, name) = stem
            .split_once('_')
            .unwrap_or_else(|| panic!("migration {stem} must be named NNNN_name.sql"));
        let version: i32 = version
            .parse()
            .unwrap_or_else(|_| panic!("migration {stem} must start with a number"));
        assert!(seen.insert(version), "two migrations share version {version}");
        writeln!(
            out,
            "    ({version}, {name:?}, include_str!({:?})),",
            path.canonicalize().unwrap()
        )
        .unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(dest, out).unwrap();
}
