//! The image endpoints, as routes name them (`endpoints = ["generations", ...]`).

/// The image endpoints imagegate forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Generations,
    Edits,
    Variations,
}

impl Endpoint {
    pub const ALL: [Endpoint; 3] = [Endpoint::Generations, Endpoint::Edits, Endpoint::Variations];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Generations => "generations",
            Endpoint::Edits => "edits",
            Endpoint::Variations => "variations",
        }
    }

    pub fn parse(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.as_str() == name)
    }
}
