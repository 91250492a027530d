// The edgediff Android library: the wrapper (src/main/kotlin, also compiled by the JVM test), the
// UniFFI bindings and the native libraries, both written by ../scripts/build-jni.sh.
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.edgediff"
    compileSdk = 35

    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        // The ABIs build-jni.sh builds; others would load no library at run time.
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    sourceSets {
        getByName("main") {
            // Generated, not committed: the bindings always match the library beside them.
            java.srcDirs("src/main/kotlin", "generated/uniffi")
            // jniLibs/<abi>/libedgediff_ffi.so, the default location, written by build-jni.sh.
        }
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    // The generated bindings call the library through JNA; the AAR carries libjnidispatch.so.
    implementation("net.java.dev.jna:jna:5.17.0@aar")
    // Flow is in the wrapper's signatures.
    api("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.10.2")
}
