// swift-tools-version:5.9
// The EdgeDiff Swift package: the wrapper plus the generated bindings (Sources/EdgeDiff), over the
// Rust library as an XCFramework of static libraries. Both generated parts come from
// scripts/build-xcframework.sh; run it before building.
import PackageDescription

let package = Package(
    name: "EdgeDiff",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "EdgeDiff", targets: ["EdgeDiff"]),
    ],
    targets: [
        .binaryTarget(name: "EdgeDiffFFI", path: "EdgeDiffFFI.xcframework"),
        .target(
            name: "EdgeDiff",
            dependencies: ["EdgeDiffFFI"],
            path: "Sources/EdgeDiff",
            // A static Rust library carries no link directives: name what wgpu's Metal backend
            // and the standard library use.
            linkerSettings: [
                .linkedFramework("Metal"),
                .linkedFramework("QuartzCore"),
                .linkedFramework("CoreGraphics"),
                .linkedFramework("Foundation"),
            ]
        ),
    ]
)
