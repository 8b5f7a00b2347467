//! A `sluice:plugin@0.2.0` validator that tries to change the objects it validates through
//! their handles, drops the handles, and reports what the host answered. It uses the
//! bindings directly: the SDK's `Validator` gives a validator no way to write.

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code, clippy::all, reason = "wit-bindgen's generated exports")]
mod component {
    sluice_plugin_sdk::wit_bindgen::generate!({
        path: "../../../wit/v0.2",
        world: "validator",
        runtime_path: "::sluice_plugin_sdk::wit_bindgen::rt",
    });
    use sluice::plugin::types as wit;

    struct Export;
    impl Guest for Export {
        fn validate_config(_: String) -> Result<(), String> {
            Ok(())
        }
        fn validate(_: wit::Context, objects: Vec<wit::Object>) -> Vec<wit::Finding> {
            let mut answers = Vec::new();
            for o in &objects {
                answers.push(format!(
                    "{:?}",
                    o.set_string("/metadata/labels/mutated", "yes")
                ));
                answers.push(format!("{:?}", o.remove("/spec")));
            }
            drop(objects);
            vec![wit::Finding {
                severity: wit::Severity::Warning,
                message: answers.join("; "),
                object: None,
                field: None,
                proposed_value: None,
                rule: None,
            }]
        }
    }
    export!(Export);
}
