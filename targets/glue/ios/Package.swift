// swift-tools-version:5.9
import PackageDescription

let package = Package(
    name: "OssedgeCoreML",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [.library(name: "OssedgeCoreML", targets: ["OssedgeCoreML"])],
    targets: [.target(name: "OssedgeCoreML", path: "Sources/OssedgeCoreML")]
)
