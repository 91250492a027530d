// The SDK in an app: load once, stream into a Text, stop by cancelling the consuming task.
import EdgeDiff
import SwiftUI

struct ContentView: View {
    @State private var engine: EdgeDiff?
    @State private var prompt = "Once upon a time"
    @State private var output = ""
    @State private var generation: Task<Void, Never>?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            TextField("Prompt", text: $prompt)
                .textFieldStyle(.roundedBorder)
            HStack {
                Button("Generate", action: start).disabled(engine == nil)
                // Cancelling the task ends the stream's iteration, which cancels the generation.
                Button("Stop") { generation?.cancel() }
            }
            ScrollView {
                Text(output).frame(maxWidth: .infinity, alignment: .leading)
            }
        }
        .padding()
        .task { await load() }
    }

    private func load() async {
        // Copied in with the Files app or Finder (UIFileSharingEnabled in the app's Info.plist).
        let model = FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0]
            .appendingPathComponent("model.edm")
        do {
            let loaded = try await EdgeDiff.load(path: model.path)
            engine = loaded
            output = "\(loaded.modelInfo)\n"
        } catch {
            output = "Cannot load \(model.path): \(error)"
        }
    }

    private func start() {
        guard let engine else { return }
        generation?.cancel()
        output = ""
        let config = GenerationConfig(maxNewTokens: 256, chat: true)
        generation = Task {
            do {
                for try await piece in engine.generate(prompt, config: config) {
                    output += piece
                }
                if let last = engine.stats.last {
                    output += "\n\n\(last.newTokens) tokens, \(Int(last.tokensPerSecond)) tokens/s"
                }
            } catch {
                output += "\n\nerror: \(error)"
            }
        }
    }
}
