// The Kotlin face of edgediff: the generated UniFFI bindings (package dev.edgediff.ffi) wrapped in
// coroutines. Shipped by the Android library and compiled unchanged by the JVM test
// (android/jvm-test), so what CI tests is what apps get.
package dev.edgediff

import dev.edgediff.ffi.EdgeDiffException
import dev.edgediff.ffi.Engine
import dev.edgediff.ffi.EngineConfig
import dev.edgediff.ffi.EngineStats
import dev.edgediff.ffi.GenerationConfig
import dev.edgediff.ffi.GenerationResult
import dev.edgediff.ffi.GenerationStats
import dev.edgediff.ffi.ModelInfo
import dev.edgediff.ffi.ReasonConfig
import dev.edgediff.ffi.ReasonEvent
import dev.edgediff.ffi.ReasonListener
import dev.edgediff.ffi.ReasonResult
import dev.edgediff.ffi.TokenListener
import kotlinx.coroutines.CoroutineDispatcher
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.channels.trySendBlocking
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.withContext

/** A model opened on a backend. Close it to free the weights; generations may run concurrently. */
class EdgeDiff private constructor(private val engine: Engine) : AutoCloseable {
    companion object {
        /**
         * Opens a `.edm` model file on [dispatcher] (loading reads the whole file). On the GPU,
         * pass `EngineConfig(pipelineCacheDir = context.cacheDir.path)`: later launches then build
         * the model's kernels while it loads instead of before its first token.
         *
         * @throws EdgeDiffException.Io the file is missing or unreadable
         * @throws EdgeDiffException.InvalidModel the file is not a model
         */
        suspend fun load(
            path: String,
            config: EngineConfig = EngineConfig(),
            dispatcher: CoroutineDispatcher = Dispatchers.IO,
        ): EdgeDiff = withContext(dispatcher) { EdgeDiff(Engine.load(path, config)) }
    }

    /**
     * Streams the generated text, piece by piece, as it becomes final. The generation starts when
     * the flow is collected and is cancelled when the collector is (scope cancelled, `take`,
     * `first`, …); its failures are thrown from `collect` as [EdgeDiffException].
     */
    fun generate(prompt: String, config: GenerationConfig = GenerationConfig()): Flow<String> =
        callbackFlow {
            val listener = object : TokenListener {
                override fun onText(text: String) {
                    // Blocks the engine's own thread while the collector is behind: back-pressure
                    // instead of an unbounded buffer. Fails at once when the flow is closed, and
                    // awaitClose has then cancelled the generation already.
                    this@callbackFlow.trySendBlocking(text)
                }

                override fun onFinished(stats: GenerationStats) {
                    channel.close()
                }

                override fun onError(error: EdgeDiffException) {
                    channel.close(error)
                }
            }
            val task = engine.generate(prompt, config, listener)
            awaitClose {
                task.cancel()
                task.close()
            }
        }

    /**
     * Markovian RSA on [query]: N reasoning traces per round, each later round aggregating the
     * tails of K traces of the one before. Emits every [ReasonEvent] as [ReasonProgress.Event]
     * and ends with [ReasonProgress.Done]; cancelling the collector cancels the run; failures are
     * thrown from `collect` as [EdgeDiffException] (a bad config before anything runs).
     */
    fun reason(query: String, config: ReasonConfig = ReasonConfig()): Flow<ReasonProgress> =
        callbackFlow {
            val listener = object : ReasonListener {
                override fun onEvent(event: ReasonEvent) {
                    this@callbackFlow.trySendBlocking(ReasonProgress.Event(event))
                }

                override fun onFinished(result: ReasonResult) {
                    this@callbackFlow.trySendBlocking(ReasonProgress.Done(result))
                    channel.close()
                }

                override fun onError(error: EdgeDiffException) {
                    channel.close(error)
                }
            }
            val task = engine.reason(query, config, listener)
            awaitClose {
                task.cancel()
                task.close()
            }
        }

    /** The whole text at once; cancelling the calling coroutine cancels the generation. */
    suspend fun generateText(
        prompt: String,
        config: GenerationConfig = GenerationConfig(),
    ): GenerationResult = engine.generateAsync(prompt, config)

    fun tokenize(text: String, addSpecial: Boolean = false): List<UInt> =
        engine.tokenize(text, addSpecial)

    fun detokenize(tokens: List<UInt>): String = engine.detokenize(tokens)

    val modelInfo: ModelInfo
        get() = engine.modelInfo()

    /** Counters since loading; `last` is the most recent finished generation's. */
    val stats: EngineStats
        get() = engine.stats()

    override fun close() = engine.close()
}

/** What [EdgeDiff.reason] emits: the run's events, then its result. */
sealed interface ReasonProgress {
    data class Event(val event: ReasonEvent) : ReasonProgress

    data class Done(val result: ReasonResult) : ReasonProgress
}
