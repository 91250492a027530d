// The Swift face of edgediff: the generated UniFFI bindings (Generated/edgediff_ffi.swift, written
// by scripts/build-xcframework.sh) wrapped in Swift concurrency.
import Foundation

/// A model opened on a backend. Generations may run concurrently; the weights are freed when the
/// last reference goes.
public final class EdgeDiff: Sendable {
    /// The generated object, for what the wrapper does not cover.
    public let engine: Engine

    public init(engine: Engine) {
        self.engine = engine
    }

    /// Opens a `.edm` model file off the caller's actor (loading reads the whole file).
    /// Throws `EdgeDiffError.Io` for a missing file, `.InvalidModel` for one that is not a model.
    /// Without a `pipelineCacheDir` the app's Caches directory keeps the compiled GPU kernels'
    /// list (`Caches/edgediff`), so later launches build them while the model loads.
    public static func load(path: String, config: EngineConfig = EngineConfig()) async throws -> EdgeDiff {
        let resolved = withCachesDirectory(config)
        return try await Task.detached(priority: .userInitiated) {
            EdgeDiff(engine: try Engine.load(path: path, config: resolved))
        }.value
    }

    private static func withCachesDirectory(_ config: EngineConfig) -> EngineConfig {
        var config = config
        if config.pipelineCacheDir == nil,
            let caches = FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask).first
        {
            config.pipelineCacheDir = caches.appendingPathComponent("edgediff", isDirectory: true).path
        }
        return config
    }

    /// Streams the generated text, piece by piece, as it becomes final. Ending the iteration early
    /// (`break`, the consuming task cancelled, the stream released) cancels the generation; its
    /// failures are thrown as `EdgeDiffError`.
    public func generate(
        _ prompt: String,
        config: GenerationConfig = GenerationConfig()
    ) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            do {
                let task = try engine.generate(
                    prompt: prompt, config: config, listener: StreamListener(continuation))
                // Also what keeps the handle alive: releasing it would cancel the generation.
                continuation.onTermination = { @Sendable _ in task.cancel() }
            } catch {
                continuation.finish(throwing: error)
            }
        }
    }

    /// Markovian RSA on `query`: N reasoning traces per round, each later round aggregating the
    /// tails of K traces of the one before. Yields every `ReasonEvent` as `.event`, then `.done`
    /// with the result; ending the iteration early cancels the run; failures (a bad config before
    /// anything runs) are thrown as `EdgeDiffError`.
    public func reason(
        _ query: String,
        config: ReasonConfig = ReasonConfig()
    ) -> AsyncThrowingStream<ReasonProgress, Error> {
        AsyncThrowingStream { continuation in
            do {
                let task = try engine.reason(
                    query: query, config: config, listener: ReasonStreamListener(continuation))
                continuation.onTermination = { @Sendable _ in task.cancel() }
            } catch {
                continuation.finish(throwing: error)
            }
        }
    }

    /// The whole text at once; cancelling the calling task cancels the generation.
    public func generateText(
        _ prompt: String,
        config: GenerationConfig = GenerationConfig()
    ) async throws -> GenerationResult {
        try await engine.generateAsync(prompt: prompt, config: config)
    }

    public func tokenize(_ text: String, addSpecial: Bool = false) throws -> [UInt32] {
        try engine.tokenize(text: text, addSpecial: addSpecial)
    }

    public func detokenize(_ tokens: [UInt32]) throws -> String {
        try engine.detokenize(tokens: tokens)
    }

    public var modelInfo: ModelInfo { engine.modelInfo() }

    /// Counters since loading; `last` is the most recent finished generation's.
    public var stats: EngineStats { engine.stats() }
}

/// Forwards the engine's callbacks (on its own thread) into the stream.
private final class StreamListener: TokenListener {
    private let continuation: AsyncThrowingStream<String, Error>.Continuation

    init(_ continuation: AsyncThrowingStream<String, Error>.Continuation) {
        self.continuation = continuation
    }

    func onText(text: String) throws {
        continuation.yield(text)
    }

    func onFinished(stats: GenerationStats) throws {
        continuation.finish()
    }

    func onError(error: EdgeDiffError) throws {
        continuation.finish(throwing: error)
    }
}

/// What `EdgeDiff.reason` yields: the run's events, then its result.
public enum ReasonProgress: Sendable {
    case event(ReasonEvent)
    case done(ReasonResult)
}

/// Forwards a reasoning run's callbacks (on its own thread) into the stream.
private final class ReasonStreamListener: ReasonListener {
    private let continuation: AsyncThrowingStream<ReasonProgress, Error>.Continuation

    init(_ continuation: AsyncThrowingStream<ReasonProgress, Error>.Continuation) {
        self.continuation = continuation
    }

    func onEvent(event: ReasonEvent) throws {
        continuation.yield(.event(event))
    }

    func onFinished(result: ReasonResult) throws {
        continuation.yield(.done(result))
        continuation.finish()
    }

    func onError(error: EdgeDiffError) throws {
        continuation.finish(throwing: error)
    }
}
