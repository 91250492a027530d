// A one-screen SwiftUI app over the EdgeDiff package (see ../README.md to put it in an Xcode app).
import SwiftUI

@main
struct EdgeDiffSampleApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}
