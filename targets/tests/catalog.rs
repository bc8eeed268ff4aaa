//! Every profile file is valid, listed, and named after its profile; the catalog has the
//! device families issue 7 asks for plus the generic profiles the backends started with.

use std::collections::BTreeSet;
use std::path::Path;

use slmc_targets::{catalog, lookup, parse_profile, PROFILE_FILES};

#[test]
fn every_profile_file_is_valid_and_compiled_in() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        parse_profile(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        on_disk.insert(file);
    }
    let listed: BTreeSet<String> = PROFILE_FILES.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(on_disk, listed, "targets/profiles and PROFILE_FILES disagree");
    let names: BTreeSet<&str> = catalog().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), catalog().len(), "duplicate names");
    assert!(catalog().len() >= 16, "{} profiles", catalog().len());
}

#[test]
fn the_catalog_covers_the_device_families_and_the_generic_names() {
    for name in [
        "webgpu",
        "vulkan",
        "metal",
        "onnx-cpu",
        "onnx-portable",
        "coreml-ios18",
        "coreml-ios17",
        "apple-a16",
        "apple-a17-pro",
        "apple-a18",
        "apple-m1",
        "apple-m4",
        "adreno-740",
        "adreno-750",
        "adreno-830",
        "mali-g715",
        "mali-g720",
        "tensor-g3",
        "tensor-g4",
        "raspberry-pi-5",
        "x86-64-laptop",
        "snapdragon-npu-qnn",
        "webgpu-browser",
    ] {
        lookup(name).unwrap_or_else(|e| panic!("{e}"));
    }
    let browser = lookup("webgpu-browser").unwrap();
    assert_eq!(browser.limits.max_storage_buffer_binding_size, Some(128 << 20));
    assert!(browser.features.is_empty(), "browsers promise no optional features by default");
    // Unknown facts stay unknown, and code generation falls back to WebGPU's defaults.
    let pi = lookup("raspberry-pi-5").unwrap();
    assert_eq!(pi.limits.max_storage_buffer_binding_size, None);
    assert_eq!(pi.binding_limit(), Some(128 << 20));
    assert_eq!(lookup("onnx-cpu").unwrap().binding_limit(), None);
}

#[test]
fn invalid_profiles_and_unknown_names_are_explained() {
    let good = PROFILE_FILES.iter().find(|(f, _)| *f == "adreno-750.json").unwrap().1;
    let err = parse_profile("adreno-750.json", &good.replace("\"spirv\"", "\"cuda\"")).unwrap_err().to_string();
    assert!(err.contains("adreno-750.json") && err.contains("backend `cuda`"), "{err}");
    let err = parse_profile("adreno-750.json", &good.replace("\"shader-f16\"", "\"shader-f64\"")).unwrap_err();
    assert!(err.to_string().contains("unknown feature `shader-f64`"), "{err}");
    let err = parse_profile("other.json", good).unwrap_err();
    assert!(err.to_string().contains("must be named after it"), "{err}");
    let err =
        parse_profile("adreno-750.json", &good.replace("\"version\": 1", "\"version\": 1, \"colour\": 2")).unwrap_err();
    assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    let err = lookup("adreno-75").unwrap_err();
    assert_eq!(err.suggestions.first().map(String::as_str), Some("adreno-750"));
    assert!(err.to_string().contains("did you mean `adreno-750`"), "{err}");
    let err = lookup("tpu").unwrap_err();
    assert!(err.to_string().starts_with("unknown target `tpu`"), "{err}");
}
