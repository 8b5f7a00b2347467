//! The choices of agentk's configuration that the engine acts on, spelled as agentk spells
//! them (`dry_run_strategy`, `prune_propagation_policy`, `inventory_policy`).

/// Declares an enum read from its configuration spelling (an empty string is the default),
/// for the agent's own string-valued settings too.
#[doc(hidden)]
#[macro_export]
macro_rules! string_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? } default $default:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }
        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }
        impl $name {
            /// The configuration spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as ::serde::Deserialize>::deserialize(d)?;
                match s.as_str() {
                    "" => Ok($name::$default),
                    $($text => Ok($name::$variant),)+
                    other => Err(<D::Error as ::serde::de::Error>::custom(format!(
                        "invalid value {other:?}, expected one of: {}",
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}

string_enum!(
    /// `dry_run_strategy`.
    DryRunStrategy {
        /// Apply for real.
        None = "none",
        /// Make no mutating calls at all.
        Client = "client",
        /// Send every mutating call with `dryRun=All`.
        Server = "server",
    } default None
);
string_enum!(
    /// `prune_propagation_policy`.
    PropagationPolicy {
        /// Leave dependents.
        Orphan = "orphan",
        /// Delete now, dependents in the background.
        Background = "background",
        /// Delete dependents first.
        Foreground = "foreground",
    } default Foreground
);
string_enum!(
    /// `inventory_policy` (agentk/cli-utils semantics).
    InventoryPolicy {
        /// Only objects owned by this inventory are changed.
        MustMatch = "must_match",
        /// Objects owned by no inventory are adopted.
        AdoptIfNoInventory = "adopt_if_no_inventory",
        /// Every object is adopted, even from other inventories.
        AdoptAll = "adopt_all",
    } default MustMatch
);
