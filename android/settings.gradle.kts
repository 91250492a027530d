// The Android SDK: `:edgediff` (the library: Kotlin wrapper, generated bindings, jniLibs) and
// `:sample` (an app using it). Run scripts/build-jni.sh first; see README.md.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "edgediff-android"
include(":edgediff", ":sample")
