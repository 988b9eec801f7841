//! Links librbd and librados (Debian's librbd-dev and librados-dev ship them; no pkg-config file).
fn main() {
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
