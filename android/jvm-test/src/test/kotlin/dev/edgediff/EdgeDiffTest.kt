// The Kotlin SDK end to end on the JVM: the real libedgediff_ffi (host build) through the generated
// bindings and the wrapper the Android library ships, against a synthetic model written by
// `edgediff synth`. Run by bindings/scripts/jvm-test.sh, which passes the model's path and the
// library's directory as system properties.
package dev.edgediff

import dev.edgediff.ffi.AdapterPreference
import dev.edgediff.ffi.Decoder
import dev.edgediff.ffi.EdgeDiffException
import dev.edgediff.ffi.EngineConfig
import dev.edgediff.ffi.FinishReasonKind
import dev.edgediff.ffi.GenerationConfig
import dev.edgediff.ffi.ReasonConfig
import dev.edgediff.ffi.ReasonEvent
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.awaitCancellation
import kotlinx.coroutines.cancelAndJoin
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import kotlin.test.AfterTest
import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertTrue
import kotlin.test.fail

class EdgeDiffTest {
    private val modelPath: String =
        System.getProperty("edgediff.model")?.takeIf { it.isNotEmpty() }
            ?: fail("-Dedgediff.model=<tiny.edm> is required (bindings/scripts/jvm-test.sh sets it)")

    // The CPU backend: deterministic, and present on every CI machine.
    private val engine: EdgeDiff =
        runBlocking { EdgeDiff.load(modelPath, EngineConfig(adapter = AdapterPreference.CPU)) }

    @AfterTest
    fun closeEngine() = engine.close()

    private fun long(maxNewTokens: Int, decoder: Decoder? = null) =
        GenerationConfig(maxNewTokens = maxNewTokens.toUInt(), ignoreEos = true, decoder = decoder)

    @Test
    fun modelInfoDescribesTheSyntheticModel() {
        val info = engine.modelInfo
        assertEquals("qwen3_moe", info.architecture)
        assertTrue(info.paramsActive < info.paramsTotal, "$info")
        assertTrue(info.vocabSize > 0u && info.numExperts > info.expertsPerToken, "$info")
        assertEquals(engine.stats.backend, info.backend)
    }

    @Test
    fun tokenizeThenDetokenizeRoundTrips() {
        val text = "the quick brown fox"
        val ids = engine.tokenize(text)
        assertTrue(ids.isNotEmpty())
        assertEquals(text, engine.detokenize(ids))
    }

    @Test
    fun theFlowStreamsTheWholeText() = runBlocking {
        val pieces = engine.generate("Once upon a time", long(24)).toList()
        assertTrue(pieces.size > 1, "streamed in pieces: $pieces")
        val last = engine.stats.last ?: fail("no stats after a finished generation")
        assertEquals(FinishReasonKind.LENGTH, last.finishReason)
        assertEquals(24u, last.newTokens)

        // Greedy: the one-shot call gives the very text the flow streamed.
        val whole = engine.generateText("Once upon a time", long(24))
        assertEquals(whole.text, pieces.joinToString(""))
        assertEquals(24, whole.tokens.size)
        assertEquals(2uL, engine.stats.generations)
    }

    @Test
    fun cancellingTheCollectorCancelsTheGeneration() = runBlocking {
        val max = 500
        val started = CompletableDeferred<Unit>()
        var received = 0
        val collector = launch {
            engine.generate("Once", long(max, Decoder.Autoregressive)).collect {
                received += 1
                if (received == 2) {
                    started.complete(Unit)
                    // A collector that stops taking: the engine fills the flow's buffer and waits,
                    // so it cannot finish on its own before the cancellation below.
                    awaitCancellation()
                }
            }
        }
        withTimeout(120_000) { started.await() }
        collector.cancelAndJoin()

        // The engine thread sees the cancellation within one step, then records the generation.
        val last = withTimeout(120_000) {
            while (engine.stats.generations == 0uL) delay(10)
            engine.stats.last!!
        }
        assertEquals(FinishReasonKind.CANCELLED, last.finishReason)
        assertTrue(last.newTokens < max.toUInt(), "stopped early: ${last.newTokens} of $max tokens")
        assertEquals(2, received)
    }

    @Test
    fun aMissingFileIsAnIoException() {
        val e = assertFailsWith<EdgeDiffException.Io> {
            runBlocking { EdgeDiff.load("/nonexistent/model.edm") }
        }
        assertTrue(e.message!!.isNotEmpty())
    }

    @Test
    fun anExpertBudgetBelowOneLayersTopKIsATypedException() {
        val tiny = EngineConfig(expertMemoryBudget = 1uL, adapter = AdapterPreference.CPU)
        val e = assertFailsWith<EdgeDiffException.InvalidArgument> {
            runBlocking { EdgeDiff.load(modelPath, tiny) }
        }
        assertTrue("at least" in e.message!!, e.message)
    }

    @Test
    fun reasonStreamsRoundsThenItsResult() = runBlocking {
        val config = ReasonConfig(
            n = 3u, k = 2u, rounds = 1u, tailTokens = 8u, thinkBudget = 6u, maxTokens = 4u,
            answerRegex = "(\\S+)\\s*$", seed = 3uL,
        )
        val updates = engine.reason("What is 2 + 3?", config).toList()
        val done = updates.last() as? ReasonProgress.Done ?: fail("no result last: ${updates.last()}")
        val events = updates.dropLast(1).map { (it as ReasonProgress.Event).event }
        val rounds = events.filterIsInstance<ReasonEvent.RoundDone>()
        assertEquals(listOf(0u, 1u), rounds.map { it.round })
        assertEquals(6, events.filterIsInstance<ReasonEvent.TraceFinished>().size)
        val aggregating = events.filterIsInstance<ReasonEvent.TraceStarted>().filter { it.round == 1u }
        assertTrue(aggregating.all { it.parents.size == 2 }, "$aggregating")
        assertEquals(6u, done.result.traces)
        assertTrue(done.result.peakKvBytes > 0uL, "${done.result}")
        assertEquals(rounds.last().votes, done.result.votes)
    }

    @Test
    fun aReasonConfigWithKAboveNIsATypedException() {
        assertFailsWith<EdgeDiffException.InvalidArgument> {
            runBlocking { engine.reason("x", ReasonConfig(n = 2u, k = 3u)).toList() }
        }
    }

    @Test
    fun anInvalidRequestFailsTheFlowWithATypedException() {
        assertFailsWith<EdgeDiffException.InvalidArgument> {
            runBlocking { engine.generate("x", GenerationConfig(maxNewTokens = 0u)).toList() }
        }
    }
}
