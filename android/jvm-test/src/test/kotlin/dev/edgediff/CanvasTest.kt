// DiffusionGemma's canvas decoder through the Kotlin SDK (issue 18): an app picks it with
// Decoder.Canvas (the default of such a model), text streams canvas by canvas, cancelling the
// collector cancels the generation, and a decoder the model cannot run is a typed exception.
// bindings/scripts/jvm-test.sh writes the model (a synthetic diffusion_gemma, canvas of 5).
package dev.edgediff

import dev.edgediff.ffi.AdapterPreference
import dev.edgediff.ffi.Decoder
import dev.edgediff.ffi.EdgeDiffException
import dev.edgediff.ffi.EngineConfig
import dev.edgediff.ffi.FinishReasonKind
import dev.edgediff.ffi.GenerationConfig
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
import kotlin.test.assertNotEquals
import kotlin.test.assertTrue
import kotlin.test.fail

class CanvasTest {
    private val modelPath: String =
        System.getProperty("edgediff.canvasModel")?.takeIf { it.isNotEmpty() }
            ?: fail("-Dedgediff.canvasModel=<dg.edm> is required (bindings/scripts/jvm-test.sh sets it)")

    private val engine: EdgeDiff =
        runBlocking { EdgeDiff.load(modelPath, EngineConfig(adapter = AdapterPreference.CPU)) }

    @AfterTest
    fun closeEngine() = engine.close()

    private fun canvas(maxNewTokens: Int, decoder: Decoder?) = GenerationConfig(
        maxNewTokens = maxNewTokens.toUInt(), ignoreEos = true, decoder = decoder, seed = 7uL,
    )

    @Test
    fun theCanvasDecoderStreamsItsTextCanvasByCanvas() = runBlocking {
        assertEquals("diffusion_gemma", engine.modelInfo.architecture)
        // 12 tokens: three canvases of 5, 3 denoising steps each.
        val config = canvas(12, Decoder.Canvas(steps = 3u))
        val pieces = engine.generate("Once", config).toList()
        assertTrue(pieces.size in 2..3, "one piece per committed canvas: $pieces")
        val last = engine.stats.last ?: fail("no stats after a finished generation")
        assertEquals(FinishReasonKind.LENGTH, last.finishReason)
        assertEquals(12u, last.newTokens)
        assertEquals("canvas: 3 canvases, 9 steps", last.decoder)

        // Seeded: the one-shot call gives the streamed text.
        val whole = engine.generateText("Once", config)
        assertEquals(whole.text, pieces.joinToString(""))

        // Without a decoder the model's own runs (the canvas sampler, its file's 48 steps); a
        // setting the app gives changes what is decoded.
        val default = engine.generateText("Once", canvas(5, null))
        assertEquals("canvas: 1 canvases, 48 steps", default.stats.decoder)
        val hot = engine.generateText("Once", canvas(12, Decoder.Canvas(steps = 3u, tMax = 3.0f)))
        assertNotEquals(whole.tokens, hot.tokens)
    }

    @Test
    fun cancellingTheCollectorCancelsACanvasGeneration() = runBlocking {
        val max = 300
        val started = CompletableDeferred<Unit>()
        val collector = launch {
            engine.generate("Once", canvas(max, Decoder.Canvas(steps = 4u))).collect {
                started.complete(Unit)
                awaitCancellation()
            }
        }
        withTimeout(120_000) { started.await() }
        collector.cancelAndJoin()
        val last = withTimeout(120_000) {
            while (engine.stats.generations == 0uL) delay(10)
            engine.stats.last!!
        }
        assertEquals(FinishReasonKind.CANCELLED, last.finishReason)
        assertTrue(last.newTokens < max.toUInt(), "stopped early: ${last.newTokens} of $max tokens")
    }

    @Test
    fun aDecoderTheModelCannotRunIsATypedException() {
        val e = assertFailsWith<EdgeDiffException.InvalidArgument> {
            runBlocking { engine.generate("x", canvas(5, Decoder.Autoregressive)).toList() }
        }
        assertTrue("canvas" in e.message!!, e.message)
    }
}
